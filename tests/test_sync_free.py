"""``MoEConfig.sync_free`` on one process: what it computes, that it reads nothing on the host, that it compiles whole.

At ep 1 the per-sender capacity of the padded dispatcher is the default layer's capacity over the same tokens,
so the two layers must agree on outputs, aux loss, every gradient and the statistics whenever no protected
pair overflows its expert's slots. The compiled layer is checked against eager by benchmarks/bench_sync_free.py
(subprocess: dynamo stays out of this process) in every routing mode with a capacity.
"""
import contextlib
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_ep import MoEConfig, MoELayer
from moe_ep.dispatch.padded import padded_slots

pytestmark = pytest.mark.timeout(120)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOSSES = dict(expert_balance_coef=0.01, device_balance_coef=0.01, comm_balance_coef=0.01, z_loss_coef=1e-3)
BASE = dict(hidden_size=16, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
            expert_capacity_factor=1.0, eval_capacity_factor=1.5, **LOSSES)
MODES = {
    "expert_position_gelu": dict(BASE, drop_policy="position", activation="gelu"),
    "expert_affinity_shared": dict(BASE, n_shared_experts=1),
    "expert_and_device_v2": dict(BASE, topk_method="device_limited", n_group=4, topk_group=2, drop_policy="affinity",
                                 device_capacity_factor=1.0, routed_scaling_factor=16.0),
    "v3_node_limited_bias": dict(BASE, scoring_func="sigmoid", topk_method="node_limited", n_group=4, topk_group=2,
                                 norm_topk_prob=True, aux_free_bias=True, seq_balance_coef=1e-3),
}


def _step(layer: MoELayer, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * g).sum().add(layer.aux_loss).backward()
    return [y, layer.aux_loss, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("mode", list(MODES))
def test_equals_the_default_layer_at_ep1(mode):
    """Training and eval forwards, the bias moving in between: outputs, aux loss, gradients and statistics."""
    cfg = MoEConfig(**MODES[mode])
    default, sync_free = MoELayer(cfg), MoELayer(cfg.replace(sync_free=True))
    sync_free.load_state_dict(default.state_dict())
    for step, train in enumerate((True, True, False)):
        x, g = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
        results = []
        for layer in (default, sync_free):
            layer.train(train)
            results.append((_step(layer, x, g), layer.last_stats.as_dict()))
            layer.update_bias()
            layer.zero_grad()
        (want, want_stats), (got, got_stats) = results
        for a, b in zip(got, want):  # fp32 sums in another order: within 1e-5 of the magnitude
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * (1 + b.abs().max().item()))
        assert got_stats == want_stats, step
        assert want_stats["dropped_pairs"] > 0 or not train
    assert sync_free.dispatcher.kind == "padded" and sync_free.forward_count == 3


def test_protected_pairs_beyond_the_slots_are_dropped_and_counted():
    """All tokens to one expert, every sequence protected: the default layer keeps all (protection outranks the
    capacity); the sync-free layer fills the expert's C slots and drops the rest, and counts them."""
    cfg = MoEConfig(**dict(BASE, protected_seq_frac=1.0))
    default, sync_free = MoELayer(cfg), MoELayer(cfg.replace(sync_free=True))
    for layer in (default, sync_free):
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[3] = 1.0
    x = torch.randn(2, 12, 16).abs() + 0.1  # every token's best expert is 3
    stats = []
    for layer in (default, sync_free):
        layer(x)
        stats.append(layer.last_stats.as_dict())
    T, K, E = 24, 2, 8
    capacity = T * K // E
    assert stats[0]["processed_pairs"] == T * K and stats[0]["dropped_pairs"] == 0
    assert stats[1]["tokens_per_expert"][3] == T
    assert stats[1]["processed_pairs"] + stats[1]["dropped_pairs"] == stats[1]["routed_pairs"] == T * K
    assert stats[1]["dropped_pairs"] == sum(max(0, n - capacity) for n in stats[1]["tokens_per_expert"]) > 0


def test_eval_without_an_eval_capacity_keeps_the_training_capacity():
    """Buffers sized by a capacity cannot take every pair: in eval without ``eval_capacity_factor`` the
    training factors apply (the default layer drops nothing there)."""
    cfg = MoEConfig(**dict(BASE, eval_capacity_factor=None, sync_free=True))
    layer, x = MoELayer(cfg), torch.randn(2, 12, 16)
    dropped = []
    for train in (True, False):
        layer.train(train)
        with torch.no_grad():
            layer(x)
        dropped.append(layer.last_stats.as_dict()["dropped_pairs"])
    assert dropped[0] == dropped[1] > 0


def test_padded_slots_put_protected_pairs_first():
    expert_P = torch.tensor([1, 0, 1, 1, 1, 0])
    keep_P = torch.tensor([True, True, False, True, True, True])
    protected_P = torch.tensor([False, False, False, True, True, False])
    slot_P = padded_slots(expert_P, keep_P, protected_P, slots=2, n_experts=2)
    # expert 1: pairs 3 and 4 (protected) take slots 2 and 3; pair 0 overflows; pair 2 was dropped
    assert slot_P.tolist() == [4, 0, 4, 2, 3, 1]


class _NoHostReads(TorchDispatchMode):
    """Fails on every aten op that reads a tensor value on the host or sizes its output by one (on a GPU: a
    stream synchronisation, and no CUDA graph)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "bincount", "masked_select", "unique", "_unique2", "item",
               "repeat_interleave.Tensor", "equal", "is_nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1] + ("." + func._overloadname if func._overloadname != "default"
                                                   else "")
        assert not name.startswith(self.SYNCING), f"host read: aten::{name}"
        if name.startswith("index"):
            assert not any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in _flat(args[1:2])), name
        return func(*args, **(kwargs or {}))


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


@contextlib.contextmanager
def _no_host_reads():
    def forbid(name):
        def forbidden(*args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return forbidden

    with pytest.MonkeyPatch.context() as patch, _NoHostReads():
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            patch.setattr(torch.Tensor, name, forbid(name))
        yield


@pytest.mark.parametrize("mode", ["expert_position_gelu", "expert_and_device_v2", "v3_node_limited_bias"])
def test_forward_and_backward_read_nothing_on_the_host(mode):
    """Training (protected sequences, the drop step) and eval; the bias update after."""
    layer = MoELayer(MoEConfig(**dict(MODES[mode], protected_seq_frac=0.5, sync_free=True)))
    x, g = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    with _no_host_reads():
        for train in (True, False):
            layer.train(train)
            _step(layer, x, g)
            layer.update_bias()
    assert layer.pending_drop_forwards == 0 and int(layer.drop_step) == 1


@pytest.mark.parametrize("field,value", [("dispatcher", "hierarchical"), ("overlap_chunks", 2),
                                         ("check_finite", True), ("recompute_experts", True),
                                         ("expert_backend", "loop"), ("redundant_experts", 8)])
def test_conflicting_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}: .* sync_free"):
        MoEConfig(**dict(BASE, sync_free=True, **{field: value}))
    with pytest.raises(ValueError, match="MoEConfig.sync_free: needs expert_capacity_factor"):
        MoEConfig(**dict(BASE, sync_free=True, expert_capacity_factor=None))


def _bench(out: pathlib.Path, *args: str, timeout: int) -> list[dict]:
    """bench_sync_free.py's records (ep 1, tiny, correctness only), run in a process of its own."""
    out = out / "records.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sync_free.py"), "--tiny", "--iters", "0",
                          "--check-steps", "2", "--json", str(out), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.timeout(600)
def test_compiles_whole_in_every_mode_with_a_capacity(tmp_path):
    """``torch.compile(layer, fullgraph=True)`` (dynamo + AOT autograd, ``aot_eager``: no code generation, so the
    test stays fast) on every routing mode of bench_sync_free.MODES: one graph each, never recompiled over
    training steps that move the bias and the drop step, outputs and gradients equal to eager."""
    records = _bench(tmp_path, "--backend", "aot_eager", timeout=580)
    assert len(records) == 4 and all(r["graphs"] == 1 and r["max_err"] <= 1e-5 for r in records), records


@pytest.mark.timeout(600)
def test_inductor_compiled_layer_equals_eager(tmp_path):
    """The same with inductor (C++ code for CPU), in the mode that uses the most of the layer."""
    (record,) = _bench(tmp_path, "--modes", "v2_device_limited_dropping", timeout=580)
    assert record["graphs"] == 1 and record["max_err"] <= 1e-5, record
