"""benchmarks/router_stats.py, project.py, project_fit.py: statistics and model formulas on hand-made cases."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("bench_modules")


def test_layout_stats_counts_ranks_nodes_and_forwarded_rows():
    # 16 experts on 8 GPUs (2 each), 4 GPUs per node -> 2 nodes. Every token picks experts 0, 1 (GPU 0),
    # 2 (GPU 1) and 9 (GPU 4, node 1).
    idx_TK = torch.tensor([[0, 1, 2, 9]] * 64)
    from router_stats import layout_stats

    s = layout_stats(idx_TK, E=16, G=8, gpus_per_node=4, seed=0)
    home_T = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % 8
    hit = {0, 1, 4}
    remote = sum(len(hit - {h}) for h in home_T.tolist()) / 64
    inter = sum(len({g for g in hit if g // 4 != h // 4}) for h in home_T.tolist()) / 64
    nodes = sum(len({g // 4 for g in hit} - {h // 4}) for h in home_T.tolist()) / 64
    # hop 2: in each hit node, the hit GPUs other than the one with the home's local index
    hop2 = sum(len({g for g in hit if g % 4 != h % 4}) for h in home_T.tolist()) / 64
    assert s["remote_ranks"] == pytest.approx(remote) and s["internode_ranks"] == pytest.approx(inter)
    assert s["remote_nodes"] == pytest.approx(nodes) and s["hop2_rows"] == pytest.approx(hop2)
    assert s["imbalance"] == pytest.approx(2 / (4 / 8))  # GPU 0 gets 2 of every token's 4 pairs


def test_routing_rules_keep_k_experts_reachable():
    from router_stats import routing_rules

    rules = routing_rules(E=256, K=8, G=256, gpus_per_node=8, device_limit=4, node_limit=4)
    assert rules["device_limited"]["topk_group"] == 8  # 1 expert per GPU: M must reach K GPUs
    assert rules["node_limited"] == dict(topk_method="node_limited", n_group=32, topk_group=4)
    assert routing_rules(256, 8, 16, 8, 4, 4)["node_limited"]["topk_group"] == 2  # only 2 nodes


def test_comm_model_flat_and_two_hop():
    import project

    shape = project.Shape(hidden=1000, tokens=10, dispatch_bytes=2)
    hw = dict(bw_intra=100.0, bw_inter=10.0, alpha_intra=1.0, alpha_inter=2.0)
    stats = dict(gpus=16, nodes=2, imbalance=1.5, remote_ranks=5.0, internode_ranks=3.0, remote_nodes=1.0,
                 hop2_rows=4.0)
    B = 2000  # row bytes
    flat = 2.0 + max(1.5 * 10 * 2 * B / 100, 1.5 * 10 * 3 * B / 10)
    two_hop = (2.0 + 1.5 * 10 * 1 * B / 10) + (1.0 + 1.5 * 10 * 4 * B / 100)
    assert project.comm_time(stats, shape, hw, "flat") == pytest.approx(4 * flat)
    assert project.comm_time(stats, shape, hw, "two_hop") == pytest.approx(4 * two_hop)
    one_node = dict(stats, nodes=1, internode_ranks=0.0, remote_nodes=0.0)
    assert project.comm_time(one_node, shape, hw, "two_hop") == pytest.approx(
        project.comm_time(dict(one_node, remote_ranks=4.0), shape, hw, "flat"))  # one node: hop 2 only


def test_expert_roofline_switches_to_memory_bound_with_few_tokens():
    import project

    hw = {k: v for k, (v, _) in project.HARDWARE.items()}
    stats = dict(gpus=8, imbalance=1.0)
    assert project.compute_times(stats, project.Shape(), hw, 0.6)["experts_compute_bound"]
    assert not project.compute_times(stats, project.Shape(tokens=16), hw, 0.6)["experts_compute_bound"]


def test_fit_line_recovers_alpha_and_bandwidth():
    from project_fit import fit_line

    alpha, bw = fit_line([(b, 3e-4 + b / 2e9) for b in (1e3, 1e5, 1e6, 1e7)])
    assert alpha == pytest.approx(3e-4) and bw == pytest.approx(2e9)


def test_overlap_model_serial_and_pipelined_schedules():
    """c = 1 exposes every transfer; c chunks with link time = compute time hide all but the fill and drain."""
    from overlap_model import Phase, backward_time, forward_time, split

    d, e = 0.3, 0.5  # one pass of the whole batch, the whole batch's compute
    assert forward_time(Phase(d, 0.0, e), 1) == pytest.approx(2 * d + e)
    assert backward_time(Phase(d, 0.0, e), 1) == pytest.approx(2 * d + e)
    two_hop = Phase(d, 0.1, e)
    assert forward_time(two_hop, 1) == pytest.approx(2 * d + 2 * 0.1 + e)
    # 4 chunks, each pass 1 and each compute 2: the link carries 8 transfers of 1 and is never the bottleneck;
    # forward = first dispatch (1) + 4 computes (8) + last combine (1)
    assert forward_time(split(4.0, 0.0, 8.0, 4, 0.0, 0.0), 4) == pytest.approx(10.0)
    # link-bound (passes of 2, compute 1 per chunk): the link is busy end to end, 8 transfers of 2
    assert forward_time(split(8.0, 0.0, 4.0, 4, 0.0, 0.0), 4) == pytest.approx(16.0)
    # every chunk pays its all-to-all start-up again
    assert split(1.0, 0.0, 1.0, 4, alpha_outer=0.2, alpha_inner=0.0).outer_s == pytest.approx(0.2 + 0.8 / 4)
    for c in (1, 2, 4, 8):  # never below the work of either resource
        t = forward_time(split(4.0, 0.0, 8.0, c, 0.0, 0.0), c)
        assert t >= max(8.0, 2 * 4.0) - 1e-9


def test_training_step_projection_on_a_hand_computed_dense_pipeline():
    """No MoE layer (no all-to-all, no imbalance), 2 stages, the last one (with the head) slower: 1F1B's schedule
    lasts F0 + m (F1 + B1) + B0 (the last stage never waits; the first one starts it and ends it), with F the
    stage's forward FLOPs over the GEMM rate and B = 2 F; the step adds the DP all-reduce."""
    from project_training import ModelShape, dp_reduce_seconds, project_step

    H, I_d, V, S, T = 64, 256, 100, 32, 32
    model = ModelShape("toy", layers=4, dense_layers=4, hidden=H, dense_ffn=I_d, experts=8, top_k=2, ffn=16,
                       shared=0, shared_ffn=16, vocab=V, attn_params=4.0 * H * H, attn_score_flops=2.0 * S * H,
                       seq_len=S)
    hw = dict(peak_flops=1e9, bf16_peak=1e9, hbm_bw=1e12, bw_intra=1e9, bw_inter=1e8, alpha_intra=0.0,
              alpha_inter=0.0)
    stats = dict(gpus=8, nodes=1, imbalance=1.0, remote_ranks=0.0, internode_ranks=0.0, remote_nodes=0.0,
                 hop2_rows=0.0)
    p, m, eff = 2, 6, 0.5
    r = project_step(model, stats, hw, pp=p, ep=1, dp=2, schedule="1f1b", overlap="none", micro_batches=m,
                     tokens=T, gemm_eff=eff)
    layer = 2 * T * (4 * H * H + 3 * H * I_d) + T * 2 * S * H            # one layer's forward FLOPs
    F0, F1 = 2 * layer / (1e9 * eff), (2 * layer + 2 * T * H * V) / (1e9 * eff)  # stage 1: 2 layers + head
    assert r["makespan_s"] == pytest.approx(F0 + m * 3 * F1 + 2 * F0)
    # DP: stage 1 holds 2 layers and the head: ring over dp x ep = 2 ranks -> 2 (n-1)/n = 1, fp32 gradients
    stage1 = 2 * (4 * H * H + 3 * H * I_d) + V * H
    assert r["dp_s"] == pytest.approx(stage1 * 4 / 1e8)
    assert dp_reduce_seconds(dict(non_expert=1e9, expert=5e8), dp=2, ep=4, grad_bytes=4, bw=50e9) == \
        pytest.approx((1.75 * 1e9 + 1.0 * 5e8) * 4 / 50e9)
    assert r["step_s"] == pytest.approx(r["makespan_s"] + r["dp_s"])
    assert r["tokens_per_gpu_s"] == pytest.approx(m * T / (p * r["step_s"]))
    assert r["shares"]["exposed_a2a"] == pytest.approx(0, abs=1e-12) and r["shares"]["imbalance"] == 0
    assert sum(r["shares"].values()) == pytest.approx(1)
    assert r["memory"][0]["in_flight"] == p  # 1F1B: the first rank holds p micro-batches


def test_fb_overlap_hides_the_smaller_of_compute_and_all_to_all():
    """An OVERLAP_F_B pair lasts max(compute, all-to-all) of its forward and backward; apart, their sum."""
    from project_training import action_parts

    acts = [dict(F=3.0, I=5.0, W=2.0, c_F=2.0, c_I=2.0, c_W=2.0, imb_F=0.0, imb_I=0.0, imb_W=0.0, comm_F=1.0,
                 comm_B=3.0)] * 2
    pair = ("FB", -1, None, (("F", 0, 1, ()), ("B", 1, 0, ())))
    assert action_parts(pair, acts, overlap_fb=False)[0] == pytest.approx(3.0 + 5.0 + 2.0)
    assert action_parts(pair, acts, overlap_fb=True)[:2] == pytest.approx((max(6.0, 4.0), 6.0))


def test_eplb_model_reproduces_the_measured_imbalance_and_lowers_it():
    from project_training import eplb_imbalance

    plain = eplb_imbalance(1.8, experts=64, gpus=16, nodes=2, redundant=0.0, draws=8)
    assert plain["plain_check"] == pytest.approx(1.8, rel=0.02)  # the fitted lognormal gives the measured max/mean
    more = eplb_imbalance(1.8, experts=64, gpus=16, nodes=2, redundant=0.25, draws=8)
    assert 1.0 <= more["imbalance"] < plain["imbalance"] < 1.8
    assert eplb_imbalance(1.8, 64, 16, 2, None)["imbalance"] == 1.8
