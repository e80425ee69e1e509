"""Expert-parallel load balancing on one process (moe_ep/eplb/, docs/eplb.md).

The planner against its contract and against exhaustive optima on small inputs; bad inputs; the
placement's replica choice; the slot transfer and the replica gradient sum simulated over 4 ranks; a layer with redundant experts
against the layer without them (outputs, gradients after the replica sum, norms, training steps, moves
with AdamW moments); checkpoints stored in the logical layout; the re-plan's metrics, plot and flag.
tests/parallel/test_eplb.py trains with replicas across processes.
"""
import itertools
import json
from pathlib import Path

import pytest
import torch

from moe_ep import MoEConfig, MoELayer, ParallelState
from moe_ep.checkpoint import load_weights, write_checkpoint
from moe_ep.eplb import plan_placement, rank_loads
from moe_ep.eplb.balancer import Rebalancer, max_over_mean
from moe_ep.eplb.gradients import ReplicaSum
from moe_ep.eplb.move import SlotTransfer
from moe_ep.eplb.placement import Placement
from moe_ep.eplb.planner import balanced_packs, replica_counts
from moe_ep.gradients import clip_gradients, sync_gradients
from moe_ep.layer import check_layout
from moe_ep.model_moe import moe_layers, parameter_counts
from moe_ep.models import ModelConfig, MoETransformerLM


def zipf(E: int, s: float, seed: int = 0) -> torch.Tensor:
    """Loads proportional to rank^-s over a random order of the experts."""
    load = torch.arange(1, E + 1, dtype=torch.float64) ** -s
    return load[torch.randperm(E, generator=torch.Generator().manual_seed(seed))] * 1e4


# ------------------------------------------------------------------ planner
@pytest.mark.parametrize("E,P,groups,nodes,ranks", [(16, 16, 16, 1, 4), (16, 20, 16, 2, 4), (16, 24, 4, 2, 4),
                                                    (64, 80, 8, 2, 4), (12, 18, 2, 2, 6)])
def test_plan_keeps_the_contract(E, P, groups, nodes, ranks):
    """int64 [L, P]; every logical expert at least once; equal slots per rank; each group and every replica of an
    expert on one node; no two replicas of one expert on one rank while it has fewer than the node's ranks."""
    load_LE = torch.stack([zipf(E, s, seed) for seed, s in enumerate((0.0, 0.8, 1.6))])
    phy2log_LP = plan_placement(load_LE, P, groups, nodes, ranks)
    assert phy2log_LP.dtype == torch.int64 and phy2log_LP.shape == (3, P)
    S, node_slots = P // ranks, P // nodes
    for phy2log_P in phy2log_LP:
        Placement(phy2log_P, E, ranks, nodes)  # every expert placed, replicas on one node (checked there)
        assert torch.bincount(phy2log_P, minlength=E).min() >= 1
        node_P = torch.arange(P) // node_slots
        for g in range(groups):
            members = (phy2log_P // (E // groups) == g)
            assert node_P[members].unique().numel() == 1, f"group {g} spans nodes"
        for r in range(ranks):
            on_rank = phy2log_P[r * S:(r + 1) * S]
            assert torch.equal(on_rank, on_rank.sort().values)
            if torch.bincount(phy2log_P, minlength=E).max() <= ranks // nodes:
                assert on_rank.unique().numel() == S, f"rank {r} holds one expert twice: {on_rank.tolist()}"
    assert torch.equal(plan_placement(load_LE[1], P, groups, nodes, ranks), phy2log_LP[1])  # [E] -> [P], same plan


def test_plan_balances_skewed_loads():
    """Zipf loads over 64 experts at 2 nodes x 2 ranks: contiguous placement 1.2-2.1x the mean; the plan with
    25 % redundant slots within 1.10; replicas never make it worse (beyond 1e-3: the planner is a heuristic)."""
    for s in (0.8, 1.2, 1.6):
        load = zipf(64, s)
        contiguous = max_over_mean(load, torch.arange(64), 4)
        planned = {R: max_over_mean(load, plan_placement(load, 64 + R, 64, 2, 4), 4) for R in (0, 8, 16)}
        assert contiguous > 1.15 and planned[16] <= 1.10 and planned[0] <= contiguous
        assert max(planned[8], planned[16]) <= planned[0] + 1e-3


def _exhaustive_packs(weights, n_packs):
    """The smallest possible largest pack sum over every split of ``weights`` into equal packs."""
    n, size = len(weights), len(weights) // n_packs
    best = float("inf")
    for labels in itertools.product(range(n_packs), repeat=n):
        if all(labels.count(p) == size for p in range(n_packs)):
            best = min(best, max(sum(w for w, lab in zip(weights, labels) if lab == p) for p in range(n_packs)))
    return best


def test_packing_and_replication_against_exhaustive_optima():
    """Packs of 8 random weights in 2 and 4 packs: optimal in most cases, always within LPT's 4/3 bound; replica
    counts minimise the largest weight per replica (checked over every split of the extra slots)."""
    gen = torch.Generator().manual_seed(5)
    optimal = 0
    for trial in range(12):
        weights = (torch.rand(8, generator=gen) ** 3).tolist()
        n_packs = 2 if trial % 2 else 4
        packs = balanced_packs(weights, n_packs)
        assert sorted(i for p in packs for i in p) == list(range(8)) and {len(p) for p in packs} == {8 // n_packs}
        got, best = max(sum(weights[i] for i in p) for p in packs), _exhaustive_packs(weights, n_packs)
        assert got <= best * (4 / 3) + 1e-12
        optimal += got <= best + 1e-12
        counts = replica_counts(weights[:5], 9, cap=9)
        brute = min(max(w / c for w, c in zip(weights[:5], split))
                    for split in itertools.product(range(1, 6), repeat=5) if sum(split) == 9)
        assert sum(counts) == 9 and max(w / c for w, c in zip(weights[:5], counts)) == pytest.approx(brute)
    assert optimal >= 9
    assert replica_counts([10.0, 1.0], 4, cap=2) == [2, 2]  # a third replica would share a rank with another
    assert replica_counts([10.0, 1.0], 6, cap=2) == [4, 2] and replica_counts([10.0, 1.0], 3, cap=1) == [2, 1]


@pytest.mark.parametrize("args,message", [
    ((torch.ones(8), 6, 8, 1, 2), "cannot hold"), ((torch.ones(8), 10, 3, 1, 2), "n_groups=3"),
    ((torch.ones(8), 10, 2, 4, 4), "n_groups=2 groups do not split over n_nodes=4"),
    ((torch.ones(8), 9, 8, 1, 2), "n_physical=9"), ((torch.ones(8), 12, 8, 2, 3), "n_ranks=3"),
    ((-torch.ones(8), 8, 8, 1, 2), "non-negative"), ((torch.full((8,), float("nan")), 8, 8, 1, 2), "finite"),
    ((torch.ones(2, 2, 2), 8, 2, 1, 2), r"\[E\] or \[L, E\]"), ((torch.ones(8), 8.0, 8, 1, 2), "n_physical"),
    ((torch.ones(8), 8, 8, 0, 2), "n_nodes")])
def test_plan_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(*args)


def test_rank_loads_split_replicas_evenly():
    load = torch.tensor([6.0, 2.0, 1.0, 1.0])
    assert rank_loads(load, torch.tensor([0, 1, 0, 2, 3, 0]), 3).tolist() == [4.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="does not fit"):
        rank_loads(load, torch.tensor([0, 1, 2, 3, 0]), 2)


# ------------------------------------------------------------------ placement
@pytest.mark.parametrize("phy2log,message", [([0, 1, 2, 2], "have no slot"), ([0, 1, 2, 4], "outside"),
                                             ([0, 1, 2, 3, 0, 1], "several nodes"), ([0, 1, 2], "slots for 4")])
def test_placement_refuses_bad_plans(phy2log, message):
    with pytest.raises(ValueError, match=message):
        Placement(torch.tensor(phy2log), 4, n_ranks=2 if len(phy2log) != 6 else 2, n_nodes=2)


def test_replica_choice_splits_each_senders_pairs_evenly():
    """Each replica of an expert gets within one pair of an equal share of a sender's kept pairs; a dropped pair
    gets its expert's first slot; experts with one slot keep it; the offset moves with the rank."""
    placement = Placement(torch.tensor([0, 1, 0, 2, 0, 3]), 4, n_ranks=3)  # expert 0 in slots 0, 2, 4
    gen = torch.Generator().manual_seed(0)
    expert_TK = torch.randint(0, 4, (200, 2), generator=gen)
    keep_TK = torch.rand(200, 2, generator=gen) > 0.2
    for rank in range(3):
        slot_TK = placement.slots(expert_TK, keep_TK, rank)
        assert torch.equal(placement.phy2log_P[slot_TK], expert_TK)
        kept = slot_TK[keep_TK & (expert_TK == 0)]
        counts = torch.bincount(kept, minlength=6)[[0, 2, 4]]
        assert counts.max() - counts.min() <= 1 and counts.sum() == kept.numel()
        assert (slot_TK[~keep_TK & (expert_TK == 0)] == 0).all()
    assert not torch.equal(placement.slots(expert_TK, keep_TK, 0), placement.slots(expert_TK, keep_TK, 1))


def test_slot_transfer_over_simulated_ranks():
    """4 ranks, 8 experts: logical layout -> a plan with 4 replicas -> another plan -> logical. Each rank's new
    rows are exactly the rows of the experts its new slots hold; rows a rank keeps do not travel."""
    ranks = 4
    logical = torch.arange(8)
    plans = [plan_placement(zipf(8, 1.2, seed), 12, 8, 2, ranks) for seed in (1, 2)]
    rows_E = torch.arange(8.0)[:, None] * 10 + torch.arange(3.0)  # row of expert e: [10e, 10e + 1, 10e + 2]
    layouts = [logical, *plans, logical]
    local = [rows_E[logical.view(ranks, -1)[r]] for r in range(ranks)]
    for old, new in zip(layouts, layouts[1:]):
        transfers = [SlotTransfer(old, new, ranks, r) for r in range(ranks)]
        sent = [local[r][t.send_rows] for r, t in enumerate(transfers)]
        blocks = [list(s.split(t.send_counts)) for s, t in zip(sent, transfers)]
        new_local = []
        for r, t in enumerate(transfers):  # rank r receives block r of every sender, in sender order
            received = torch.cat([blocks[src][r] for src in range(ranks)])
            assert [len(blocks[src][r]) for src in range(ranks)] == t.recv_counts
            out = torch.empty(len(new) // ranks, 3)
            out[t.recv_rows] = received
            new_local.append(out)
            assert torch.equal(out, rows_E[new.view(ranks, -1)[r]])
            stays = torch.isin(new.view(ranks, -1)[r], old.view(ranks, -1)[r])
            assert t.send_counts[r] == int(stays.sum()), "a row this rank holds already was fetched elsewhere"
        local = new_local


def test_replica_sum_over_simulated_ranks():
    """4 ranks of 2 nodes, every expert replicated: after the two exchanges (simulated) each slot holds the sum of
    its expert's slots; rows go only to and from the primary's rank."""
    placement = Placement(plan_placement(torch.arange(1.0, 9.0) ** 3, 16, 8, 2, 4), 8, 4, 2)
    S, grads = placement.slots_per_rank, torch.randn(16, 3)
    sums = [ReplicaSum(placement, r) for r in range(4)]
    sent = [grads[r * S:(r + 1) * S][t.send_rows].split(t.send_counts) for r, t in enumerate(sums)]
    out = []
    for r, t in enumerate(sums):
        own = grads[r * S:(r + 1) * S].clone()
        out.append(own.index_add_(0, t.add_rows, torch.cat([sent[src][r] for src in range(4)])))
    back = [out[r][t.add_rows].split(t.recv_counts) for r, t in enumerate(sums)]
    for r, t in enumerate(sums):
        out[r][t.send_rows] = torch.cat([back[src][r] for src in range(4)])
        assert all(count == 0 for d, count in enumerate(t.send_counts) if d // 2 != r // 2), "a row crossed nodes"
    expected = torch.zeros(8, 3).index_add_(0, placement.phy2log_P, grads)[placement.phy2log_P]
    assert torch.allclose(torch.cat(out), expected)


# ------------------------------------------------------------------ layer
CFG = MoEConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                n_shared_experts=1, expert_balance_coef=1e-2, aux_free_bias=True)


def _pair(redundant: int = 4, **fields):
    torch.manual_seed(0)
    ref = MoELayer(CFG.replace(**fields))
    layer = MoELayer(CFG.replace(redundant_experts=redundant, **fields))
    layer.load_full_state_dict(ref.state_dict())
    return ref, layer


def _logical_grads(layer: MoELayer) -> dict:
    out = {}
    for name, p in layer.named_parameters():
        grad = p.grad
        if name.startswith("experts.") and layer.placement is not None:
            grad = grad[layer.placement.slots_EC[:, 0]]
        out[name] = grad
    return out


@pytest.mark.parametrize("fields", [{}, dict(expert_capacity_factor=0.8), dict(device_capacity_factor=1.0,
                                    device_groups=2, topk_method="device_limited", n_group=4, topk_group=2)])
def test_layer_with_replicas_equals_the_layer_without(fields):
    """Outputs, aux loss, statistics and (after the replica sum) every logical gradient equal the layer's without
    replicas, dropping included; the replicas' gradients are equal; the clipped norm counts each expert once."""
    ref, layer = _pair(**fields)
    assert layer.experts.w_in.shape[0] == 12 and layer.placement.count_E.sum() == 12
    x = torch.randn(4, 16, 32)
    y_ref, y = ref(x), layer(x)
    assert torch.allclose(y, y_ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(layer.aux_loss, ref.aux_loss, atol=1e-7)
    for key in ("tokens_per_expert", "routed_pairs", "dropped_pairs", "processed_pairs"):
        assert layer.last_stats.as_dict()[key] == ref.last_stats.as_dict()[key], key
    g = torch.randn_like(x)
    (y_ref * g).sum().add(ref.aux_loss).backward()
    (y * g).sum().add(layer.aux_loss).backward()
    sync_gradients(layer, ParallelState())
    got, expected = _logical_grads(layer), dict(ref.named_parameters())
    for name, grad in got.items():
        assert torch.allclose(grad, expected[name].grad, atol=1e-6, rtol=1e-5), name
    for p in layer.experts.parameters():
        assert torch.equal(p.grad, p.grad[layer.placement.slots_EC[layer.placement.phy2log_P, 0]])
    norm, norm_ref = clip_gradients(layer, ParallelState(), 1e-3), clip_gradients(ref, ParallelState(), 1e-3)
    assert norm == pytest.approx(norm_ref.item(), rel=1e-6)


def test_moves_carry_weights_and_adam_moments():
    """Training steps with replicas, a move to another plan between them (weights and AdamW moments), and a move
    back to the logical layout: the logical weights and moments follow the layer without replicas."""
    ref, layer = _pair()
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, layer)]
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(2, 16, 32, generator=gen)
        for model, opt in zip((ref, layer), optims):
            opt.zero_grad(set_to_none=True)
            (model(x).square().sum() + model.aux_loss).backward()
            sync_gradients(model, ParallelState())
            opt.step()
        if step == 1:
            layer.set_placement(layer.plan(zipf(8, 1.5, seed=3)), optims[1])
            assert layer.experts.w_in.grad is None and layer.dispatcher.placement is layer.placement
    full, full_ref = layer.full_state_dict(), ref.full_state_dict()
    assert all(torch.allclose(full[k].float(), full_ref[k].float(), atol=1e-6) for k in full_ref)
    layer.set_placement(None, optims[1])
    assert layer.experts.w_in.shape[0] == 8
    for p, p_ref in zip(layer.experts.parameters(), ref.experts.parameters()):
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(optims[1].state[p][field], optims[0].state[p_ref][field], atol=1e-7)
    with pytest.raises(ValueError, match="does not fit this layer"):
        layer.set_placement(Placement(torch.arange(6), 6, 1))


def _tiny_model(redundant: int) -> MoETransformerLM:
    base = ModelConfig.preset("tiny")
    moe = base.moe.replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, redundant_experts=redundant)
    cfg = base.replace(hidden_size=32, n_layers=3, n_heads=2, dense_intermediate_size=64, max_seq_len=16, moe=moe)
    return MoETransformerLM(cfg, ParallelState(), seed=0)


def test_models_with_and_without_replicas_start_alike_and_checkpoint_the_logical_layout(tmp_path):
    """Same seed: the same logical weights (each slot from its expert's generator); the same parameter counts;
    a checkpoint written with replicas holds logical [E, ...] stacks, loads without replicas and back."""
    plain, replicated = _tiny_model(0), _tiny_model(2)
    for a, b in zip(moe_layers(plain), moe_layers(replicated)):
        assert all(torch.equal(v, b.full_state_dict()[k]) for k, v in a.full_state_dict().items())
    assert parameter_counts(plain) == parameter_counts(replicated)
    optimizer = torch.optim.AdamW(replicated.parameters())
    replicated(torch.randint(0, 256, (2, 16))).sum().backward()
    optimizer.step()
    write_checkpoint(tmp_path / "ckpt", replicated, ParallelState(), dict(step=1, train_config=None, data=None),
                     optimizer)
    assert replicated.layers["1"].ffn.experts.w_in.shape[0] == 10  # back in its placement after the save
    meta = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert meta["model_config"]["moe"]["redundant_experts"] == 2
    load_weights(tmp_path / "ckpt", plain, ParallelState())
    again = _tiny_model(2)
    load_weights(tmp_path / "ckpt", again, ParallelState())
    for a, b, c in zip(moe_layers(plain), moe_layers(replicated), moe_layers(again)):
        expected = b.full_state_dict()
        assert all(torch.equal(a.full_state_dict()[k], v) and torch.equal(c.full_state_dict()[k], v)
                   for k, v in expected.items())


def test_layout_checks_name_the_field():
    with pytest.raises(ValueError, match="redundant_experts=2 is not a multiple of ep_size=4"):
        check_layout(CFG.replace(redundant_experts=2), ParallelState(ep_size=4))
    with pytest.raises(ValueError, match="MoEConfig.redundant_experts"):
        MoEConfig(redundant_experts=-1)


# ------------------------------------------------------------------ training: re-plans, metrics, plot, flag
def test_rebalancer_measures_and_metrics_plot_it(tmp_path):
    """A re-plan after every 2nd step: it measures the window on the old and new placement (2 simulated ranks:
    the layer's EP group is 1 here, so the measure is the planner's), the meter records it, the plot draws it."""
    from moe_ep.training.metrics import IntervalMeter
    from moe_ep.training.plots import plot_run
    from moe_ep.training.step import StepResult

    model = _tiny_model(0)
    with pytest.raises(ValueError, match="interval"):
        Rebalancer(model, 0)
    balancer = Rebalancer(model, 2)
    meter = IntervalMeter(2, 8, 32, torch.device("cpu"))
    for layer in moe_layers(model):
        layer.load_accum.copy_(zipf(8, 1.4))
    events = [balancer.after_step(None) for _ in range(4)]
    assert events[0] is None and events[2] is None and [e["step"] for e in events[1::2]] == [2, 4]
    assert events[1]["before"] == events[1]["after"] == [1.0, 1.0]  # one rank: nothing to balance
    zero = torch.zeros(())
    for event in events:
        meter.add(StepResult(zero, zero, zero, [], eplb=event))
    record = meter.flush(ParallelState())
    assert record["eplb"] == [events[1], events[3]]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=4, **record)) + "\n")
    assert (tmp_path / "eplb.png") in plot_run(tmp_path)


def test_eplb_interval_flag(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_launcher", Path(__file__).parents[1] / "launch/train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launcher.parse_args(["--eplb-interval", "5", "--moe", "redundant_experts=2"]).eplb_interval == 5
    with pytest.raises(SystemExit):
        launcher.parse_args(["--eplb-interval", "-1"])
    assert "argument --eplb-interval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launcher.parse_args(["--preset", "tiny-dense", "--eplb-interval", "2"])
    assert "no MoE layer" in capsys.readouterr().err
