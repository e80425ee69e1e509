"""Emulated links (moe_ep/parallel/links.py) and the chunked, pipelined dispatcher (MoEConfig.overlap_chunks).

On loopback gloo a collective costs almost nothing, so the links are emulated: a collective completes no
earlier than latency + bytes / bandwidth after it starts. Compute is emulated too (experts that sleep), so
what is measured is the schedule, not this machine's load. Equivalence of every routing mode at c > 1 with
c = 1 is in tests/parallel/test_expert_parallel.py and test_hierarchical.py (``chunks`` cases).
"""
import pytest

from moe_ep.parallel.links import emulated_links
from moe_ep.parallel.spawn import run_on_ranks

from . import overlap_workers as workers

pytestmark = pytest.mark.timeout(180)


def test_an_emulated_50ms_collective_takes_at_least_50ms_and_moves_the_same_data():
    for r in run_on_ranks(workers.timed_exchange, 2, 0.05, timeout=120):
        assert r["elapsed"] >= 0.05 and r["equal"], r
        assert r["events"] == ["probe"] and r["exposed"] > 0.03, r


def test_pipelined_dispatch_hides_most_of_the_link_time():
    """Forward and backward: with 4 chunks most of the link time hides behind the experts; results unchanged."""
    for r in run_on_ranks(workers.hidden_by_chunks, 2, [1, 4], 0.2, timeout=150):
        serial, chunked = r[1], r[4]
        assert chunked["err"] <= 1e-6, r
        assert chunked["forward_exposed"] <= 0.5 * serial["forward_exposed"], r
        assert chunked["exposed"] <= 0.5 * serial["exposed"], r
        assert chunked["elapsed"] < serial["elapsed"], r


def test_weight_pass_runs_while_the_last_gradient_travels():
    """The chunks' shared weight-gradient pass runs once per layer backward, after every backward transfer is
    issued and before the last of them arrives (autograd's order of ready nodes; moe_ep.expert_ffn)."""
    for r in run_on_ranks(workers.weight_pass_timing, 2, 3, timeout=120):
        (start,) = r["starts"]
        assert r["grads"] and len(r["backward"]) == 3 * 3, r  # per chunk: its combine, rows and routing rows
        assert max(issued for issued, _ in r["backward"]) <= start < max(end for _, end in r["backward"]), r


@pytest.mark.parametrize("bad,field", [(dict(intranode_GBps=0, internode_GBps=1), "intranode_GBps"),
                                       (dict(intranode_GBps=1, internode_GBps=-2), "internode_GBps"),
                                       (dict(intranode_GBps=1, internode_GBps=1, latency_us=-1), "latency_us"),
                                       (dict(intranode_GBps="fast", internode_GBps=1), "intranode_GBps")])
def test_bad_link_speeds_are_named(bad, field):
    with pytest.raises(ValueError, match=f"emulated_links: {field}"):
        with emulated_links(**bad):
            pass
