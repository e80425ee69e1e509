"""``MoEConfig.sync_free`` at ep 2: per-sender capacities, and ``torch.compile(fullgraph=True)`` under torchrun."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from moe_ep.parallel.spawn import run_on_ranks

from .sync_free_workers import per_sender_equivalence

pytestmark = pytest.mark.timeout(300)

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
            expert_capacity_factor=1.0, sync_free=True)
MODES = {
    "expert_position": dict(BASE, drop_policy="position", n_shared_experts=1),
    "v2_device_dropping_protected": dict(BASE, topk_method="device_limited", n_group=4, topk_group=2,
                                         device_capacity_factor=1.0, protected_seq_frac=0.34,
                                         routed_scaling_factor=16.0),
    "v3_node_limited_bias": dict(BASE, scoring_func="sigmoid", topk_method="node_limited", n_group=4, topk_group=2,
                                 norm_topk_prob=True, aux_free_bias=True, activation="gelu"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_rank_drops_as_alone(mode):
    """Eager, c10d: every rank equals the single-process sync-free layer on its own tokens (sync_free_workers)."""
    results = run_on_ranks(per_sender_equivalence, 2, MODES[mode], 3, timeout=240)
    for result in results:
        assert result["kind"] == "padded"
        assert all(err <= 2e-5 for err in result["errors"].values()), result["errors"]
        assert all(got == want for got, want in result["dropped"]) and result["dropped"][0][0] > 0


@pytest.mark.timeout(900)
def test_compiles_whole_at_ep2_under_torchrun(tmp_path):
    """bench_sync_free.py under torchrun, 2 ranks, every mode with a capacity, ``aot_eager``: one graph per mode
    (functional all-to-alls and all-reduces traced), outputs and gradients equal to eager (c10d)."""
    out = tmp_path / "records.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # PYTHONFAULTHANDLER reaches the workers: a rank that aborts (one fresh-clone run saw rank 1 end in SIGABRT,
    # not reproduced since) prints its Python stack into stderr
    run = subprocess.run([*torchrun, str(ROOT / "benchmarks" / "bench_sync_free.py"), "--tiny", "--iters", "0",
                          "--check-steps", "2", "--backend", "aot_eager", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=880,
                         env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-10000:]
    records = json.loads(out.read_text())
    assert len(records) == 4 and all(r["ep"] == 2 and r["graphs"] == 1 and r["max_err"] <= 1e-5 for r in records)
