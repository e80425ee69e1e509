"""Fail fast, never hang, nothing lost (docs/reliability.md), on spawned gloo processes.

* ranks that disagree on the layout or the layer config all raise a ValueError
  naming the field and each rank's value;
* a rank that stops taking part makes the others fail within the collective
  timeout;
* a non-finite value seen by one rank makes every rank raise;
* under skewed routing with device-level dropping, the metrics' processed +
  dropped pairs equal the routed pairs, summed over ranks.
"""
import re

import pytest

from moe_ep.parallel.spawn import run_on_ranks

from . import failfast_workers as workers


@pytest.mark.timeout(120)
def test_disagreeing_ranks_all_raise_naming_the_field():
    for rank, result in enumerate(run_on_ranks(workers.disagreeing_ranks, 2, timeout=90)):
        assert result["layout_error"] == "init_expert_parallel: ranks disagree on ep_size: rank 0 has 2, rank 1 has 1"
        assert result["divide_error"] == "init_expert_parallel: ep_size=3 does not divide the world size 2"
        assert result["config_error"] == "MoELayer 'layers.1.ffn': ranks disagree on hidden_size: rank 0 has 32, " \
                                         "rank 1 has 48", rank
        assert result["timeouts"] == {"world": 7.0, "ep": 7.0, "dp": 7.0}
        assert result["y_shape"] == [3, 4, 16]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how,expected", [("sleeps", "timed out"), ("exits", "connection closed")])
def test_a_rank_that_stops_makes_the_others_fail(how, expected, tmp_path):
    timeout_s = 2.0
    results = run_on_ranks(workers.one_rank_stops, 2, how, str(tmp_path / "rank0_failed"), timeout_s, timeout=90)
    error = results[0]["error"]
    assert error is not None and expected in error.lower(), error
    # gloo's own default would wait 30 minutes; the failure comes within the timeout (plus scheduling noise)
    assert results[0]["elapsed"] < timeout_s + 30


@pytest.mark.timeout(120)
def test_nonfinite_router_logits_on_one_rank_raise_on_every_rank():
    results = run_on_ranks(workers.nonfinite_logits_on_one_rank, 2, timeout=90)
    assert results[1]["input_finite"]
    for rank, result in enumerate(results):
        message = result["message"]
        assert message and message.startswith("MoELayer 'layers.3.ffn', forward 2 (training): NaN or Inf in "), message
        local, total = map(int, re.search(r"router logits: (\d+) on this rank, (\d+) on all ranks", message).groups())
        assert total > 0 and (local == 0 if rank == 0 else local == total), message
        assert "input:" not in message


@pytest.mark.timeout(120)
def test_skewed_dropping_metrics_count_every_pair():
    steps = 3
    results = run_on_ranks(workers.skewed_dropping_metrics, 2, steps, timeout=90)
    record = results[0]["record"]
    assert all(r["record"] == {**record, "tokens_per_s": r["record"]["tokens_per_s"]} for r in results)
    n_layers, top_k = 2, 2
    assert record["routed_pairs"] == n_layers * top_k * sum(r["tokens"] for r in results)
    # all 2T pairs of a step go to EP rank 0, whose capacity is ceil(1.0 * T * K / D) = T pairs
    assert record["dropped_pairs"] == record["routed_pairs"] // 2
    assert record["processed_pairs"] + record["dropped_pairs"] == record["routed_pairs"]
    assert record["dropped_frac"] == pytest.approx(record["dropped_pairs"] / record["routed_pairs"])
