"""benchmarks/bench_grouped_gemm.py --quick runs on CPU and writes its JSON records."""
import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="moe_ep.kernels needs Triton (pip install triton)")

pytestmark = pytest.mark.timeout(120)

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_grouped_gemm.py"


def test_quick_cpu_run(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--quick", "--device", "cpu", "--experts", "2", "--tokens", "16", "--dists", "skewed",
            "--warmup", "0", "--iters", "1", "--out", str(out)]
    result = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())["results"]
    by_method = {(r["proj"], r["mode"], r["method"]): r for r in records}
    assert len(by_method) == 3 * 2 * 4  # up/down/ffn x fwd/fwdbwd x four methods
    for proj, method in (("up", "triton"), ("down", "triton"), ("ffn", "triton_fused")):
        for mode in ("fwd", "fwdbwd"):
            rec = by_method[(proj, mode, method)]
            assert rec["status"] == "interpreter-correctness" and rec["max_rel_err"] < 1e-5, rec
            dense = by_method[(proj, mode, "dense")]
            assert dense["status"] == "timed" and dense["vs_dense"] == pytest.approx(1.0)
