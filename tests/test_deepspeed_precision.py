"""DeepSpeed with bf16, fp16 loss scaling and gradient accumulation (2 gloo ranks, CPU), against the plain loop.

* bf16, ZeRO 0, 1 and 2 at ep 2: two steps match the plain loop in bf16
  (autocast) within bf16 tolerance; the V3 bias stays fp32 and bitwise
  equal on both ranks.
* Gradient accumulation: micro-batches of 4 x 2 accumulation steps give the
  weights and the V3 bias of micro-batches of 8 x 1 (ep 1 at ZeRO 0, ep 2 at
  ZeRO 2).
* fp16 (ZeRO 2, ep 2, dropping on): a step forced to overflow on one rank is
  skipped by both, and leaves the weights, the bias and the drop step as
  they were; the MoE step's pending loads are discarded; the next step applies.

The rank functions are in tests/deepspeed_precision_workers.py.
"""
import importlib.util

import pytest

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install deepspeed): DeepSpeed precision not tested",
                allow_module_level=True)

from moe_ep.parallel.spawn import run_on_ranks  # noqa: E402

from . import deepspeed_precision_workers as workers  # noqa: E402

# bf16 tolerances (seen in brackets). DeepSpeed's bf16 keeps weights, activations and gradients in bf16 where the
# plain loop autocasts fp32 weights, so they differ by more than the plain loop's own bf16-vs-fp32 difference
# (update error 0.023): losses [<= 0.1%], grad norms [<= 1.1%], ||weights - plain|| / ||plain update|| [0.072].
CE_RTOL, NORM_RTOL, UPDATE_RTOL = 1e-2, 3e-2, 0.15


@pytest.fixture(autouse=True)
def _cpu_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the spawned ranks before they import deepspeed


@pytest.mark.timeout(240)
def test_bf16_accumulation_and_fp16_overflow():
    results = run_on_ranks(workers.all_checks, 2, timeout=220)
    for rank, r in enumerate(results):
        bf16 = r["bf16"]
        assert bf16["plain_rel"] < 0.05, bf16["plain_rel"]
        for stage in (0, 1, 2):
            case, got = f"rank {rank} bf16 ZeRO-{stage}", bf16[stage]
            assert got["param_dtype"] == "torch.bfloat16" and got["bias_dtype"] == "torch.float32", case
            assert got["applied"] == [True, True], case
            for ds, plain in zip(got["ce"], bf16["plain_ce"]):
                assert ds == pytest.approx(plain, rel=CE_RTOL), f"{case}: loss {ds} vs plain {plain}"
            for ds, plain in zip(got["norms"], bf16["plain_norms"]):
                assert ds == pytest.approx(plain, rel=NORM_RTOL), f"{case}: grad norm {ds} vs plain {plain}"
            assert got["rel"] < UPDATE_RTOL, f"{case}: weights differ from the plain loop's by {got['rel']:.3f}"
            assert got["bias_bytes"] == results[0]["bf16"][stage]["bias_bytes"], f"{case}: bias differs from rank 0"

        for ep, got in r["accum"].items():
            case = f"rank {rank} ep {ep} ZeRO-{got['stage']}"
            assert got["micro_batches"] == (1, 2) and got["moved"] > 1e-3, case
            assert got["param_diff"] <= 1e-6, f"{case}: weights differ by {got['param_diff']:.2e}"
            assert got["ce"][0] == pytest.approx(got["ce"][1], rel=1e-6), case
            assert got["norms"][0] == pytest.approx(got["norms"][1], rel=1e-6), case
            assert got["bias_equal"] and got["bias_moved"] > 0, f"{case}: the bias update differs"
            assert got["pending"] == [0.0, 0.0, 0.0], case

        fp16 = r["fp16"]
        assert fp16["param_dtype"] == "torch.float16" and fp16["dropped"] > 0
        assert fp16["applied"] == [True, False, True], fp16["applied"]
        assert fp16["masters_diff"] == 0.0 and fp16["params_equal"], "the skipped step changed the weights"
        assert fp16["bias_equal"], "the skipped step moved the V3 bias"
        before, after_skip, after_next = fp16["drop_step"]
        assert after_skip == before and after_next == [d + 1 for d in before], fp16["drop_step"]
        assert fp16["pending"] == [(0.0, 0)] * 3, "the skipped step's loads were kept"
        assert fp16["next_moved"] > 0 and fp16["next_bias_moved"] > 0, "the step after the skip did not apply"
        assert fp16["skipped_steps"] == 1 and fp16["grad_norm"] > 0, fp16
