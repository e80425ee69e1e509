"""``benchmarks/gpu_check.sh --smoke``: every step of the prepared GPU check runs (toy sizes, any device).

The GPU run itself needs a GPU; this keeps the script, its benchmark flags
and ``gpu_summary.py`` working between GPU sessions.
"""
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_gpu_check_smoke_runs_every_step_and_summarises(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out),
                           "--python", sys.executable], cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["kernel_tests", "grouped_gemm", "layer", "sync_free", "train"]
    assert all(s["exit"] == 0 for s in steps)
    summary = json.loads((out / "summary.json").read_text())
    assert {r["proj"] for r in summary["grouped_gemm"]} == {"up", "down", "ffn"}
    assert summary["layer"] and summary["layer"][0]["step_ms"] > 0
    (sync_free,) = summary["sync_free"]
    assert sync_free["graphs"] == 1 and sync_free["max_err"] <= 1e-5 and sync_free["compiled_ms"] > 0
    assert summary["train"]["last_val"] < summary["train"]["first_val"]
    # at most 8 files come back from a device call
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8
