"""Redundant experts and live re-placement in training (moe_ep/eplb/, docs/eplb.md), in one run of 4 gloo processes.

* 2 emulated nodes x 2 ranks (ep 4), node-limited V3 routing, two-hop dispatch: 20 steps without replicas
  (the reference) and with 4 redundant slots re-planned every 5 steps; losses, logical weights and AdamW
  moments against the reference (1e-5, fp32), the inter-node rows of every forward; both write checkpoints.
* ep 2 (x dp 2), greedy routing: the same with 2 redundant slots.
* ep 2 (x dp 2) with an expert capacity (pairs dropped), one step and a re-plan after it: with 2 redundant
  slots, and with 0 (experts moved only: bitwise the reference).
* the ep-4 checkpoints: the one with replicas loaded at ep 2 x dp 2 into a model without them, the one without
  at ep 1 x dp 4 into a model with them.

Replicas change the order of floating-point sums, and which of two pairs of nearly equal affinity an
expert capacity keeps can flip on a difference of one ulp (then the runs part, as two runs on different
hardware would), so the 20-step comparisons run without capacities and the one with them compares one step.
"""
import pytest

from moe_ep.parallel.spawn import run_on_ranks

from .eplb_workers import train_then_load

TOL = 1e-5
V3_NODES = dict(scoring_func="sigmoid", topk_method="node_limited", n_group=2, topk_group=1, norm_topk_prob=True,
                aux_free_bias=True, expert_balance_coef=0.0, seq_balance_coef=1e-4)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("eplb")
    nodes = dict(ep_size=4, nodes=2, moe=V3_NODES, runs={"replanned": (4, 5)}, traffic=True, save=True,
                 out=str(root / "x4"))
    flat = dict(ep_size=2, moe={}, runs={"replanned": (2, 5)}, out=str(root / "x2"))
    dropping = dict(ep_size=2, moe=dict(expert_capacity_factor=1.0), runs={"replanned": (2, 1), "moved": (0, 1)},
                    steps=1, out=str(root / "x2-dropping"))
    load = dict(moe=V3_NODES, load=str(root / "x4"), into=[("replanned", 2, 0), ("reference", 1, 1)])
    per_rank = run_on_ranks(train_then_load, 4, [nodes, flat, dropping], load, timeout=420)
    return {"2 nodes x 2 ranks": [r["train"][0] for r in per_rank], "ep 2": [r["train"][1] for r in per_rank],
            "ep 2, dropping": [r["train"][2] for r in per_rank], "load": [r["load"] for r in per_rank]}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", ["2 nodes x 2 ranks", "ep 2", "ep 2, dropping"])
def test_replicas_train_as_the_reference(results, layout):
    """Every step's loss, then every logical weight and AdamW moment, within 1e-5 of the run without replicas
    (moves without replicas: bitwise); replicas hold equal rows; no pair lost; a re-plan after every
    interval, never to a worse placement, at least one of them a move."""
    ep = 4 if layout.startswith("2 nodes") else 2
    for rank_result in results[layout]:
        reference = rank_result["reference"]
        for name, run in rank_result.items():
            assert run["keys_equal"], name
            assert run["loss_diff"] <= TOL and run["state_diff"] <= TOL, (name, run["loss_diff"], run["state_diff"])
            assert run["replica_spread"] == 0.0 and run["lost_pairs"] == 0, name
            assert run["dropped"] == reference["dropped"], name
            redundant, interval = {"reference": (0, 0), "replanned": (ep, 5), "moved": (0, 5)}[name]
            if layout.endswith("dropping"):
                interval = min(interval, 1)
            assert run["slots"] == [8 // ep + redundant // ep] * 2, name
            steps = len(run["losses"])
            assert [e["step"] for e in run["events"]] == (list(range(interval, steps + 1, interval)) if interval else [])
            for event in run["events"]:
                assert all(a <= b for a, b in zip(event["after"], event["before"])), event
            if interval:
                assert any(a < b for e in run["events"] for a, b in zip(e["after"], e["before"])), name
        if "moved" in rank_result:
            assert rank_result["moved"]["loss_diff"] == 0.0 and rank_result["moved"]["state_diff"] == 0.0
    if layout.endswith("dropping"):
        assert results[layout][0]["reference"]["dropped"] > 0


@pytest.mark.timeout(600)
def test_internode_rows_follow_the_placement(results):
    """Two-hop dispatch with replicas: one inter-node row per (token, remote node of its experts' slots) in every
    forward, at most M = 1 remote node per token (node-limited routing), as many as the reference sends."""
    for rank_result in results["2 nodes x 2 ranks"]:
        for name, run in rank_result.items():
            assert run["internode"] == run["expected"] and run["remote_max"] <= 1, name
        assert sum(rank_result["replanned"]["internode"]) == sum(rank_result["reference"]["internode"])


@pytest.mark.timeout(600)
def test_checkpoints_resume_with_or_without_replicas(results):
    """The ep-4 checkpoints, written with replicas and without, load at ep 2 x dp 2 without replicas and at ep 1 x
    dp 4 with them: step 20, every logical tensor within 1e-5 of the reference's state."""
    for rank_result in results["load"]:
        assert len(rank_result) == 2
        for name, loaded in rank_result.items():
            assert loaded["step"] == 20 and loaded["keys_equal"], name
            assert loaded["placed"] == [not name.endswith("R 0")] * 2, name
            assert loaded["diff"] <= TOL, (name, loaded["diff"])
