"""Two-hop, node-aware dispatch on emulated nodes (gloo): equal to the single-process layer, less inter-node traffic.

Nodes are emulated by passing ``nodes`` to ``init_expert_parallel``. One
4-process run covers 2 nodes x 2 ranks (every routing mode, capacities, skew,
an empty rank, uneven counts), one rank per node, one node, and dp=2 x
(2 nodes x 1 rank); one 8-process run covers 2 nodes x 4 ranks. Every case
compares outputs, aux loss and all gradients with the single-process layer on
the concatenated batch (tests/parallel/equivalence.py); the traffic counters
are then checked against bounds computed here from each rank's routing.
"""
import pytest

from moe_ep import MoEConfig, MoELayer, ParallelState
from moe_ep.parallel.spawn import run_on_ranks

from .equivalence import run_cases
from .test_expert_parallel import (BOTH_CAPACITIES, CHUNKS, EXPERT_CAPACITY, GREEDY, V2_DEVICE_LIMITED, V2_DROPPING,
                                   V3_NODE_LIMITED)

V3_ONE_NODE = dict(V3_NODE_LIMITED, n_group=2, topk_group=1, num_experts_per_tok=3)  # M = 1 of 2 nodes
V3_TWO_NODES = dict(V3_NODE_LIMITED, n_group=2, topk_group=2)                        # M = 2 of 2 nodes
WIDE = dict(n_routed_experts=16)                                                      # 2 experts per rank at ep=8


def _case(name, config, dispatcher="hierarchical", ep_size=4, nodes=2, chunks=CHUNKS, **extra):
    """A case of ``equivalence.run_case``; the 4-process ones also compare ``overlap_chunks`` 2 and 3 with 1."""
    return dict(name=name, config=dict(config, dispatcher=dispatcher), ep_size=ep_size, nodes=nodes, chunks=chunks,
                **extra)


RUNS = {
    4: [
        _case("greedy_auto", GREEDY, dispatcher="auto"),
        _case("greedy_flat", GREEDY, dispatcher="flat"),
        _case("v2_device_limited", V2_DEVICE_LIMITED),
        _case("v3_node_limited_m1", V3_ONE_NODE),
        _case("v3_node_limited_m1_flat", V3_ONE_NODE, dispatcher="flat"),
        _case("v3_node_limited_m2", V3_TWO_NODES),
        _case("v2_device_dropping", V2_DROPPING),
        _case("expert_capacity_position", EXPERT_CAPACITY),
        _case("expert_and_device_capacity", BOTH_CAPACITIES),
        _case("v2_dropping_eval_no_drop", V2_DROPPING, train=False),
        _case("all_to_one_expert", GREEDY, skew_to_expert=5),
        _case("all_to_one_expert_dropping", dict(GREEDY, device_capacity_factor=1.0), skew_to_expert=1),
        _case("empty_rank", V2_DROPPING, batch_per_rank=[2, 0, 3, 1]),
        _case("uneven_counts", V3_ONE_NODE, batch_per_rank=[1, 4, 2, 3]),
        _case("all_ranks_empty_but_one", GREEDY, batch_per_rank=[0, 0, 0, 2]),
        _case("one_rank_per_node", GREEDY, nodes=4),
        _case("one_node", V2_DROPPING, nodes=1),
        _case("dp2_greedy", GREEDY, ep_size=2),
        _case("dp2_v3", V3_ONE_NODE, ep_size=2),
        _case("dp2_v3_auto", V3_ONE_NODE, dispatcher="auto", ep_size=2),  # one rank per node: flat
    ],
    8: [
        _case("2x4_greedy", dict(GREEDY, **WIDE), ep_size=8, chunks=()),
        _case("2x4_greedy_flat", dict(GREEDY, **WIDE), dispatcher="flat", ep_size=8, chunks=()),
        _case("2x4_v3_node_limited_m1", dict(V3_ONE_NODE, **WIDE), ep_size=8, chunks=()),
        _case("2x4_v2_dropping_empty_rank", dict(V2_DROPPING, **WIDE), ep_size=8,
              batch_per_rank=[1, 2, 0, 1, 3, 1, 2, 1], chunks=()),
    ],
}
CASES = {case["name"]: case for cases in RUNS.values() for case in cases}
FLAT_PAIRS = [("greedy_auto", "greedy_flat"), ("v3_node_limited_m1", "v3_node_limited_m1_flat"),
              ("2x4_greedy", "2x4_greedy_flat")]


@pytest.fixture(scope="module")
def results():
    """{case name: [per-rank result]}: one run per world size, every case of that size in it."""
    out = {}
    for world, cases in RUNS.items():
        per_rank = run_on_ranks(run_cases, world, cases, timeout=300)
        out.update({case["name"]: [rank_results[i] for rank_results in per_rank] for i, case in enumerate(cases)})
    return out


def _layout(name):
    """(config, ep_size, ranks per node, experts per rank) of a case."""
    case = CASES[name]
    cfg = MoEConfig(**case["config"])
    ep_size = case["ep_size"]
    return cfg, ep_size, ep_size // case["nodes"], cfg.n_routed_experts // ep_size


def _remote_nodes(topk_idx, home_node, experts_per_node):
    """Distinct nodes other than ``home_node`` holding one of each token's selected experts."""
    return [len({e // experts_per_node for e in token} - {home_node}) for token in topk_idx]


def _remote_ranks(topk_idx, home_node, experts_per_rank, ranks_per_node):
    """Distinct ranks on other nodes than ``home_node`` holding one of each token's selected experts."""
    return [len({e // experts_per_rank for e in token if e // experts_per_rank // ranks_per_node != home_node})
            for token in topk_idx]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(CASES))
def test_equals_single_process_layer(results, name):
    """Outputs, aux loss and every gradient within 2e-5 (asserted in the workers too); no pair lost."""
    for rank_result in results[name]:
        assert all(err <= 2e-5 for err in rank_result["errors"].values())
        stats = rank_result["stats"]
        assert stats["processed_pairs"] + stats["dropped_pairs"] == stats["routed_pairs"]


@pytest.mark.timeout(420)
def test_dispatcher_choice(results):
    """``auto``: hierarchical across nodes of several ranks, flat with one rank per node; ``flat`` is honoured."""
    for name, dispatcher in {"greedy_auto": "hierarchical", "dp2_v3_auto": "flat",
                             "greedy_flat": "flat", "2x4_greedy": "hierarchical"}.items():
        assert {r["dispatcher"] for r in results[name]} == {dispatcher}, name


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case["config"]["dispatcher"] != "flat"])
def test_one_internode_row_per_token_and_remote_node(results, name):
    """Inter-node rows = distinct remote nodes of the kept experts (<= of the selected ones; <= M node-limited)."""
    cfg, ep_size, per_node_ranks, per_rank = _layout(name)
    H = cfg.hidden_size
    for rank, rank_result in enumerate(results[name]):
        stats = rank_result["stats"]
        remote = _remote_nodes(rank_result["topk_idx"], rank % ep_size // per_node_ranks, per_rank * per_node_ranks)
        assert stats["internode_rows_sent"] <= sum(remote)
        if stats["dropped_pairs"] == 0:
            assert stats["internode_rows_sent"] == sum(remote)
        if cfg.topk_method == "node_limited":
            assert all(n <= cfg.topk_group for n in remote)
        for link in ("internode", "intranode"):
            assert stats[f"{link}_bytes_sent"] == stats[f"{link}_rows_sent"] * H * 4
        assert stats["rows_sent"] >= stats["internode_rows_sent"] + stats["intranode_rows_sent"]
    assert sum(r["stats"]["rows_sent"] for r in results[name]) == sum(r["stats"]["rows_received"]
                                                                      for r in results[name])
    if CASES[name]["nodes"] == 1:
        assert all(r["stats"]["internode_rows_sent"] == 0 for r in results[name])
    if per_node_ranks == 1:
        assert all(r["stats"]["intranode_rows_sent"] == 0 for r in results[name])


@pytest.mark.timeout(420)
@pytest.mark.parametrize("hier,flat", FLAT_PAIRS)
def test_never_more_internode_rows_than_flat(results, hier, flat):
    """Same batch and routing: flat sends one row per remote rank, the two-hop dispatcher one per remote node."""
    _, ep_size, per_node_ranks, per_rank = _layout(flat)
    for rank, (h, f) in enumerate(zip(results[hier], results[flat])):
        assert h["topk_idx"] == f["topk_idx"]
        remote_ranks = _remote_ranks(f["topk_idx"], rank // per_node_ranks, per_rank, per_node_ranks)
        assert f["stats"]["internode_rows_sent"] == sum(remote_ranks)
        assert h["stats"]["internode_rows_sent"] <= f["stats"]["internode_rows_sent"]
    total = {name: sum(r["stats"]["internode_rows_sent"] for r in results[name]) for name in (hier, flat)}
    assert total[hier] < total[flat], total


def test_dispatcher_choice_without_node_groups():
    """A hand-built state (no node groups): auto falls back to flat; hierarchical is refused by name."""
    state = ParallelState(ep_size=4, ep_rank=1, nodes=2)
    assert MoELayer(MoEConfig(**GREEDY), state).dispatcher.kind == "flat"
    with pytest.raises(ValueError, match="internode_group"):
        MoELayer(MoEConfig(**GREEDY, dispatcher="hierarchical"), state)
    assert MoELayer(MoEConfig(**GREEDY, dispatcher="hierarchical")).dispatcher.kind == "local"
