"""Expert parallelism on gloo: every layout equals the single-process layer.

For each routing mode, outputs, aux loss and gradients (input, router,
shared and every expert weight) of ep=2, ep=4 and dp=2 x ep=2 are compared
with the single-process layer over the concatenated batch built from the same
full weights (see tests/parallel/equivalence.py).
"""
import pytest

from . import workers

from .equivalence import run_cases
from moe_ep.parallel.spawn import run_on_ranks

pytestmark = pytest.mark.timeout(300)

LOSSES = dict(expert_balance_coef=0.01, device_balance_coef=0.02, comm_balance_coef=0.01, z_loss_coef=1e-3)
BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2)

GREEDY = dict(BASE, n_shared_experts=1, **LOSSES)
GREEDY_BATCH = dict(GREEDY, loss_scope="batch", switch_coef=0.01)
GREEDY_NO_SHARED = dict(BASE, **LOSSES)
V2_DEVICE_LIMITED = dict(BASE, n_shared_experts=2, num_experts_per_tok=3, topk_method="device_limited",
                         n_group=4, topk_group=2, routed_scaling_factor=16.0, **LOSSES)
V2_DROPPING = dict(V2_DEVICE_LIMITED, device_capacity_factor=1.0, protected_seq_frac=0.25)
V3_NODE_LIMITED = dict(BASE, n_shared_experts=1, num_experts_per_tok=4, scoring_func="sigmoid",
                       topk_method="node_limited", n_group=4, topk_group=2, norm_topk_prob=True,
                       routed_scaling_factor=2.5, aux_free_bias=True, seq_balance_coef=1e-3)
EXPERT_CAPACITY = dict(GREEDY, expert_capacity_factor=1.0, drop_policy="position")
BOTH_CAPACITIES = dict(V2_DEVICE_LIMITED, expert_capacity_factor=1.5, device_capacity_factor=1.0)
CHUNKS = [2, 3]  # overlap_chunks compared with 1 in every case (equivalence.py); 3 leaves chunks of unequal sizes


def _cases(ep_size: int, world: int) -> list[dict]:
    modes = {"greedy": GREEDY, "greedy_batch_scope": GREEDY_BATCH, "greedy_no_shared": GREEDY_NO_SHARED,
             "v2_device_limited": V2_DEVICE_LIMITED, "v3_node_limited_bias": V3_NODE_LIMITED}
    if world == ep_size:  # dropping's scope is the EP group: the reference sees exactly that batch
        modes.update(v2_device_dropping=V2_DROPPING, expert_capacity_position=EXPERT_CAPACITY,
                     expert_and_device_capacity=BOTH_CAPACITIES)
    cases = [dict(name=name, config=cfg, ep_size=ep_size, chunks=CHUNKS) for name, cfg in modes.items()]
    cases.append(dict(name="v2_dropping_eval_no_drop", config=V2_DROPPING if world == ep_size else V2_DEVICE_LIMITED,
                      ep_size=ep_size, train=False, chunks=CHUNKS))
    return cases


@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_equivalence_every_routing_mode(world, ep_size):
    results = run_on_ranks(run_cases, world, _cases(ep_size, world), timeout=240)
    for rank_results in results:
        for case_result in rank_results:
            assert all(err <= 2e-5 for err in case_result["errors"].values())


def test_skewed_and_uneven_batches():
    """All tokens to one expert; an empty rank; different token counts per rank."""
    cases = [
        dict(name="all_to_one_expert", config=GREEDY, ep_size=4, skew_to_expert=5, chunks=CHUNKS),
        dict(name="all_to_one_expert_dropping", config=dict(GREEDY, device_capacity_factor=1.0),
             ep_size=4, skew_to_expert=1, chunks=CHUNKS),
        dict(name="empty_rank", config=V2_DROPPING, ep_size=4, batch_per_rank=[2, 0, 3, 1], chunks=CHUNKS),
        dict(name="uneven_counts", config=V3_NODE_LIMITED, ep_size=4, batch_per_rank=[1, 4, 2, 3], chunks=CHUNKS),
        dict(name="all_ranks_empty_but_one", config=GREEDY, ep_size=4, batch_per_rank=[0, 0, 0, 2], chunks=CHUNKS),
        dict(name="backend_torch_chunked", config=dict(V2_DROPPING, expert_backend="torch"), ep_size=4,
             chunks=CHUNKS),
        dict(name="backend_triton_chunked", config=dict(GREEDY, expert_backend="triton"), ep_size=4,
             batch_per_rank=[1, 1, 1, 1], chunks=[2]),
    ]
    results = run_on_ranks(run_cases, 4, cases, timeout=240)
    skew = results[0][0]["stats"]
    assert skew["tokens_per_expert"][5] == skew["routed_pairs"] // 2  # every token picked expert 5
    dropped = results[0][1]["stats"]
    assert dropped["dropped_pairs"] > 0


def test_node_limited_two_emulated_nodes():
    """2 nodes x 2 ranks: a token reaches at most topk_group nodes."""
    cfg = dict(V3_NODE_LIMITED, n_group=2, topk_group=1, num_experts_per_tok=2)
    cases = [dict(name="two_nodes", config=cfg, ep_size=4, nodes=2)]
    results = run_on_ranks(run_cases, 4, cases, timeout=120)
    for rank_results in results:
        stats = rank_results[0]["stats"]
        # one node = 2 devices, so at most 2 destination ranks per token
        assert stats["dest_ranks_per_token_max"] <= 2


def test_triton_backend_at_ep2_equals_single_process_torch():
    """The fused Triton expert path (interpreter on CPU) at ep 2 against the single-process torch backend."""
    pytest.importorskip("triton")
    cases = [dict(name=name, config=dict(cfg, expert_backend="triton"), ep_size=2,
                  reference_overrides=dict(expert_backend="torch"))
             for name, cfg in (("greedy_swiglu", GREEDY), ("v2_dropping_swiglu", V2_DROPPING),
                               ("gelu_recompute", dict(GREEDY, activation="gelu", recompute_experts=True)))]
    results = run_on_ranks(run_cases, 2, cases, timeout=240)
    assert all(len(rank_results) == 3 for rank_results in results)


def test_dropping_cases_drop_something():
    """The dropping configurations above are not vacuous: pairs are dropped in training."""
    cases = [dict(name=n, config=c, ep_size=2) for n, c in
             (("device", V2_DROPPING), ("expert", EXPERT_CAPACITY), ("both", BOTH_CAPACITIES))]
    results = run_on_ranks(run_cases, 2, cases, timeout=120)
    for case_result in results[0]:
        assert case_result["stats"]["dropped_pairs"] > 0


def test_aux_free_bias_is_bitwise_identical_on_every_rank():
    results = run_on_ranks(workers.bias_after_steps, 4, V3_NODE_LIMITED, 4, 5, timeout=120)
    first = results[0]["bias"]
    assert any(b != 0 for b in first), "the bias never moved"
    for res in results:
        assert res["bias"] == first  # float32 values compared exactly
        assert res["bias"] == res["ref_bias"]  # same as the single process on the global batch


def test_full_state_dict_round_trip():
    assert all(run_on_ranks(workers.full_state_round_trip, 4, V2_DEVICE_LIMITED, 2, timeout=120))


def test_traffic_device_limited():
    """Distinct destinations per token never exceed M; bytes = rows x hidden x element size."""
    M = V2_DEVICE_LIMITED["topk_group"]
    results = run_on_ranks(workers.traffic, 4, V2_DEVICE_LIMITED, timeout=120)
    H = V2_DEVICE_LIMITED["hidden_size"]
    for stats in results:
        assert 1 <= stats["dest_ranks_per_token_max"] <= M
        assert stats["bytes_sent"] == stats["rows_sent"] * H * 4
        assert stats["bytes_received"] == stats["rows_received"] * H * 4
        # one row per (token, destination): never more rows than tokens x M, never fewer than tokens
        assert 64 <= stats["rows_sent"] <= 64 * M
    assert results[0]["rows_sent_total"] == results[0]["rows_received_total"]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_low_precision_dispatch(dtype_name):
    """Rows travel in the experts' dtype; results match the single-process layer to that precision."""
    errors = run_on_ranks(workers.low_precision_forward, 2, V2_DEVICE_LIMITED, dtype_name, timeout=120)
    assert max(errors) < 2e-2
