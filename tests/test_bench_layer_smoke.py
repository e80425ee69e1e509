"""benchmarks/bench_layer.py: the baselines compute what they claim, and a tiny run completes end to end."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("deepspeed", reason="the layer benchmark compares against DeepSpeed's MoE")

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
IMPLS = ("moe_ep", "moe_ep_recompute", "deepspeed", "textbook", "dense_bound", "expert_gemm_bound")
# DeepSpeed on CPU JIT-builds a shared-memory op into TORCH_EXTENSIONS_DIR when it initialises. The default,
# ~/.cache/torch_extensions, is shared by every venv of the machine, and a venv at another path rebuilds it
# (minutes under load); one folder per venv builds it once.
DS_ENV = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": os.environ.get(
    "TORCH_EXTENSIONS_DIR", str(pathlib.Path(sys.prefix) / "torch_extensions"))}


pytestmark = pytest.mark.usefixtures("bench_modules")  # conftest: benchmarks/ importable, in spawned ranks too


def _per_token_reference(moe, x_TH: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The textbook rule written pair by pair: token t keeps expert e while e has served fewer than C earlier tokens."""
    T, K, E = x_TH.shape[0], moe.top_k, len(moe.experts)
    cap = math.ceil(moe.capacity_factor * T * K / E)
    served, dropped = [0] * E, 0
    y_TH = torch.zeros_like(x_TH)
    probs_TE = torch.softmax(x_TH @ moe.gate.weight.t(), dim=-1)
    for t in range(T):
        gates, experts = probs_TE[t].topk(K)
        for g, e in zip(gates.tolist(), experts.tolist()):
            if served[e] == cap:
                dropped += 1
                continue
            served[e] += 1
            up, down = moe.experts[e][0].weight, moe.experts[e][2].weight
            y_TH[t] += g * (F.gelu(x_TH[t] @ up.t()) @ down.t())
    return y_TH, dropped


def test_textbook_moe_matches_per_token_reference():
    from textbook_moe import TextbookMoE

    moe = TextbookMoE(hidden=12, ffn=7, n_experts=4, top_k=2, capacity_factor=0.5).double()
    x_TH = torch.randn(24, 12, dtype=torch.float64)
    expected, dropped = _per_token_reference(moe, x_TH)
    assert dropped > 0  # the capacity (6 of about 12 pairs per expert) binds
    torch.testing.assert_close(moe(x_TH), expected, rtol=1e-12, atol=1e-12)
    assert moe.dropped_fraction(x_TH) == dropped / (24 * 2)


def test_expert_gemm_bound_runs_each_local_expert_on_an_even_share():
    from layer_impls import LayerSpec, ReferenceWeights, build_expert_gemm_bound, rank_context, rank_input

    spec = LayerSpec(n_experts=4, top_k=3, ffn=8, n_shared=1, hidden=16, tokens=5)  # 15 rows over 4 experts
    weights, x_TH = ReferenceWeights.random(spec, seed=1), rank_input(spec, 0)
    built = build_expert_gemm_bound(spec, weights, rank_context(0, 1, torch.device("cpu"), torch.float64), x_TH)
    outs = built.forward()
    x_rows = x_TH.double().repeat_interleave(3, dim=0)
    starts = [0, 4, 8, 12, 15]  # shares 4, 4, 4, 3
    for e in range(4):
        x_e = x_rows[starts[e]:starts[e + 1]]
        expected = F.gelu(x_e @ weights.w_in_EHI[e].double()) @ weights.w_out_EIH[e].double()
        torch.testing.assert_close(outs[e], expected)
    shared = F.gelu(x_TH.double() @ weights.shared_up_WH.double().t()) @ weights.shared_down_HW.double().t()
    torch.testing.assert_close(outs[4], shared)
    assert [g.shape[0] for g in built.grad_outputs] == [4, 4, 4, 3, 5]


def _compare_with_deepspeed(rank: int, world: int) -> dict:
    """moe_ep vs DeepSpeed's MoE on the same weights: outputs and input gradients without drops
    (ep 1 and ep ``world``), and the dropped share at capacity factor 1 (ep 1, where both rank pairs alike)."""
    import dataclasses

    from layer_impls import LayerSpec, ReferenceWeights, build_deepspeed, build_moe_ep, rank_context, rank_input

    cpu = torch.device("cpu")
    local, sharded = rank_context(rank, 1, cpu, torch.float64), rank_context(rank, world, cpu, torch.float64)
    out = {}
    for spec in (LayerSpec(n_experts=4, top_k=2, ffn=8, hidden=16, tokens=24),
                 LayerSpec(n_experts=8, top_k=3, ffn=8, n_shared=2, hidden=16, tokens=24)):
        weights, x_TH = ReferenceWeights.random(spec, seed=3), rank_input(spec, rank)
        no_drops = spec.replace(capacity_factor=spec.n_experts / spec.top_k)  # capacity = T: every pair fits
        for ctx in (local, sharded):
            results = []
            for build in (build_moe_ep, build_deepspeed):
                built = build(no_drops, weights, ctx, x_TH)
                (y,) = built.forward()
                torch.autograd.backward((y,), built.grad_outputs)
                results.append((y.detach(), built.inputs[0].grad, built.dropped_fraction()))
            (y_ep, dx_ep, drop_ep), (y_ds, dx_ds, drop_ds) = results
            out[f"k{spec.top_k} ep{ctx.ep} max |dy|"] = float((y_ep - y_ds).abs().max())
            out[f"k{spec.top_k} ep{ctx.ep} max |dx|"] = float((dx_ep - dx_ds).abs().max())
            out[f"k{spec.top_k} ep{ctx.ep} dropped"] = (drop_ep, drop_ds)
        binding = dataclasses.replace(local, dtype=torch.float32)
        out[f"k{spec.top_k} cf1 dropped"] = tuple(build(spec, weights, binding, x_TH).dropped_fraction()
                                                  for build in (build_moe_ep, build_deepspeed))
    return out


@pytest.mark.timeout(300)
def test_moe_ep_computes_deepspeeds_function():
    from moe_ep.parallel.spawn import run_on_ranks

    for rank_out in run_on_ranks(_compare_with_deepspeed, 2, timeout=280, env=DS_ENV):
        for key, value in rank_out.items():
            if " cf1 " in key:  # same capacity and ranking: the same number of pairs dropped
                assert value[0] > 0 and value[0] == pytest.approx(value[1], rel=1e-6), (key, value)
            elif key.endswith("dropped"):
                assert value == (0.0, 0.0), (key, value)
            else:  # float64 layers; the gates are fp32 in both
                assert value < 1e-6, (key, value)


@pytest.mark.timeout(300)
def test_tiny_run_writes_complete_records(tmp_path):
    out = tmp_path / "layer.json"
    args = ["--configs", "e64k6s2", "--ep", "1", "2", "--tokens", "32", "--hidden", "16", "--ffn", "8",
            "--dtypes", "fp32", "--iters", "2", "--warmup", "0", "--timeout", "280", "--json", str(out),
            "--plot", str(tmp_path)]
    result = subprocess.run([sys.executable, str(BENCH_DIR / "bench_layer.py"), *args], capture_output=True,
                            text=True, timeout=290, env={**os.environ, **DS_ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())
    cases = {(r["impl"], r["config"], r["ep"], r["dtype"]) for r in records}
    assert cases == {(i, c, ep, "fp32") for i in IMPLS for c in ("e64k6s2",) for ep in (1, 2)}
    assert len(records) == len(cases)
    for r in records:
        for key in ("fwd_ms", "step_ms", "fwd_cpu_ms", "step_cpu_ms", "tokens_per_s", "fwd_tokens_per_s",
                    "bound_ratio", "fwd_bound_ratio", "cpu_bound_ratio", "fwd_cpu_bound_ratio"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["peak_mem_mb"] >= 0 and len(r["step_samples_ms"]) == 2, r
        assert r["step_ms"] == pytest.approx(sum(r["step_samples_ms"]) / 2)  # the median of two
        if r["impl"] == "dense_bound":
            assert r["bound_ratio"] == 1.0 and r["dropped_frac"] is None
        elif r["impl"] == "expert_gemm_bound":
            assert r["dropped_frac"] is None
        else:
            assert 0.0 <= r["dropped_frac"] < 1.0 and r["capacity"], r
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["bench_layer_cpu_memory.png", "bench_layer_cpu_time.png"]
    assert "dense_bound" in result.stdout and "bf16:" in result.stdout
