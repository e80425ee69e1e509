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
