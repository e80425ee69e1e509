"""The MoE layer implementations the benchmarks compare, built from one set of weights.

``IMPLS[name](spec, weights, ctx, x_TH) -> BuiltImpl`` for

* ``moe_ep``: ``moe_ep.MoELayer`` (experts sharded over the EP group);
* ``deepspeed``: DeepSpeed's ``deepspeed.moe.layer.MoE`` (top-k gate for k > 2);
* ``textbook``: ``textbook_moe.TextbookMoE`` (a Python loop over experts; no
  expert parallelism: at ep > 1 every rank holds all experts);
* ``dense_bound``: one dense FFN of the expert width over the T*K rows a layer
  would compute (plus the shared FFN over T rows): the same GEMMs with no
  routing, the compute bound of the layer.
* ``expert_gemm_bound``: the same T*K rows split evenly over the rank's E/ep
  experts, one ``nn.Linear`` FFN (one GEMM per product) per expert, no
  routing: what one GEMM per expert costs before routing, gathering and
  combining (a reference, not a strict floor: docs/performance.md).

Every layer is a GELU MoE without biases of ``spec`` (hidden H, expert width I,
E experts, top-K, N_s shared experts fused into one FFN of width N_s * I),
loaded from the same ``ReferenceWeights``. ``CAPACITY`` says what capacity
and dropping mean for each; ``moe_ep_config`` sets moe_ep up to compute what
DeepSpeed computes where DeepSpeed's rules allow (tests/test_bench_layer_smoke.py
checks it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_ep import MoEConfig, MoELayer
from moe_ep.parallel.state import ParallelState, init_expert_parallel
from textbook_moe import TextbookMoE, gelu_ffn


@dataclass(frozen=True)
class LayerSpec:
    """One benchmark configuration; ``tokens`` are per rank."""

    n_experts: int
    top_k: int
    ffn: int
    n_shared: int = 0
    hidden: int = 512
    tokens: int = 4096
    capacity_factor: float = 1.0

    @property
    def label(self) -> str:
        shared = f" +{self.n_shared} shared" if self.n_shared else ""
        return f"{self.n_experts} experts top-{self.top_k} ffn {self.ffn}{shared}"

    def replace(self, **changes) -> "LayerSpec":
        return dataclasses.replace(self, **changes)


CONFIGS = {
    "e16k2": LayerSpec(n_experts=16, top_k=2, ffn=1024),
    "e64k6": LayerSpec(n_experts=64, top_k=6, ffn=256),
    "e64k6s2": LayerSpec(n_experts=64, top_k=6, ffn=256, n_shared=2),
    "e128k8": LayerSpec(n_experts=128, top_k=8, ffn=256),
}

CAPACITY = {
    "moe_ep": "expert capacity ceil(cf*T*K/E) with T every token of the EP group, decided by the expert's "
              "owner with all senders' pairs in view; ranking as DeepSpeed's (k<=2: all first choices "
              "before second choices, earlier tokens first; k>2: highest softmax probability first); gates "
              "renormalised over the K chosen experts",
    "moe_ep_recompute": "as moe_ep, with MoEConfig.recompute_experts: the routed experts keep no pre-activations "
                        "for backward and recompute them there (one extra grouped GEMM)",
    "deepspeed": "per-rank expert capacity ceil(cf*T*K/E) with T this rank's tokens (min_capacity=0); every "
                 "expert's buffer is padded to the capacity and exchanged whole; k=2: first choices before "
                 "second choices, earlier tokens first, second expert without Gumbel sampling; k>2: highest "
                 "probability first; gates renormalised over the kept pairs",
    "textbook": "per-expert capacity ceil(cf*T*K/E) over this rank's tokens, earliest tokens first; raw "
                "top-k softmax probabilities as gates; at ep>1 all E experts replicated on every rank "
                "(no expert parallelism, no communication)",
    "dense_bound": "no routing and no dropping: a dense GELU FFN of width I over T*K rows (+ the shared FFN "
                   "over T rows), no communication",
    "expert_gemm_bound": "no routing and no dropping: the T*K rows split evenly over the rank's E/ep experts, one "
                         "GELU FFN of width I per expert (+ the shared FFN over T rows), no communication",
}


@dataclass
class ReferenceWeights:
    """Full (unsharded) fp32 weights of one layer, in moe_ep's layout.

    router_EH: gate; w_in_EHI / w_out_EIH: routed experts (``x @ w_in[e]``);
    shared_up_WH / shared_down_HW: the fused shared FFN (``nn.Linear``
    layout, W = N_s * I), None without shared experts.
    """

    router_EH: torch.Tensor
    w_in_EHI: torch.Tensor
    w_out_EIH: torch.Tensor
    shared_up_WH: Optional[torch.Tensor]
    shared_down_HW: Optional[torch.Tensor]

    @classmethod
    def random(cls, spec: LayerSpec, seed: int = 0) -> "ReferenceWeights":
        gen = torch.Generator().manual_seed(seed)
        H, I, E, W = spec.hidden, spec.ffn, spec.n_experts, spec.n_shared * spec.ffn

        def normal(*shape, fan_in):
            return torch.randn(*shape, generator=gen) * fan_in ** -0.5

        shared = (normal(W, H, fan_in=H), normal(H, W, fan_in=W)) if W else (None, None)
        return cls(normal(E, H, fan_in=H), normal(E, H, I, fan_in=H), normal(E, I, H, fan_in=I), *shared)


@dataclass
class RankContext:
    """Where one process runs its implementations.

    parallel: moe_ep's process groups (single-process at ep 1);
    backend: the collective backend DeepSpeed is initialised with.
    """

    rank: int
    ep: int
    device: torch.device
    dtype: torch.dtype
    parallel: ParallelState
    backend: str


def rank_device(rank: int, device_type: str) -> torch.device:
    """This process's device inside ``run_on_ranks`` (which puts rank r on ``cuda:r`` with NCCL on GPUs)."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def rank_context(rank: int, ep: int, device: torch.device, dtype: torch.dtype,
                 nodes: Optional[int] = None) -> RankContext:
    """Expert parallelism of size ``ep`` on the default group (collective when ``ep > 1``),
    spanning ``nodes`` emulated nodes (``init_expert_parallel``'s default when None).

    At ep 1 every process runs a single-process layer of its own, whatever
    the world size.
    """
    parallel = init_expert_parallel(ep_size=ep, nodes=nodes) if ep > 1 else ParallelState()
    return RankContext(rank, ep, device, dtype, parallel, "nccl" if device.type == "cuda" else "gloo")


@dataclass
class BuiltImpl:
    """An implementation ready to run: ``module(*inputs)`` -> output(s), ``grad_outputs`` for backward.

    dropped_fraction: share of the T*K (token, expert) pairs this
    implementation drops for ``inputs`` (None: it never drops).
    """

    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    grad_outputs: tuple[torch.Tensor, ...]
    dropped_fraction: Callable[[], Optional[float]]

    def forward(self) -> tuple[torch.Tensor, ...]:
        out = self.module(*self.inputs)
        return out if isinstance(out, tuple) else (out,)

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        for x in self.inputs:
            x.grad = None


class RoutedPlusShared(nn.Module):
    """``routed(x)`` (the first element when it returns a tuple) plus the shared FFN, if any."""

    def __init__(self, routed: nn.Module, shared: Optional[nn.Module]):
        super().__init__()
        self.routed = routed
        self.shared = shared

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        y = self.routed(x_TH)
        y_TH = y[0] if isinstance(y, tuple) else y
        return y_TH if self.shared is None else y_TH + self.shared(x_TH)


class FFNsOverShares(nn.Module):
    """``ffns[i](x_i)`` for consecutive, near-equal shares ``x_i`` of ``x_rows`` (one output per FFN), and
    ``shared(x_TH)`` when the layer has shared experts. One FFN: the dense bound; one per local expert: the
    per-expert GEMM reference."""

    def __init__(self, ffns: nn.ModuleList, shared: Optional[nn.Module]):
        super().__init__()
        self.ffns = ffns
        self.shared = shared

    @staticmethod
    def shares(rows: int, n_ffns: int) -> list[int]:
        """``rows`` split into ``n_ffns`` counts that differ by at most one."""
        base, extra = divmod(rows, n_ffns)
        return [base + (i < extra) for i in range(n_ffns)]

    def forward(self, x_rows: torch.Tensor, x_TH: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        shares = x_rows.split(self.shares(x_rows.shape[0], len(self.ffns)))
        outs = tuple(ffn(x_i) for ffn, x_i in zip(self.ffns, shares))
        return outs if self.shared is None else outs + (self.shared(x_TH),)


# ------------------------------------------------------------------ weights
@torch.no_grad()
def _load_ffn(ffn: nn.Sequential, w_in_HI: torch.Tensor, w_out_IH: torch.Tensor) -> nn.Sequential:
    ffn[0].weight.copy_(w_in_HI.t())
    ffn[2].weight.copy_(w_out_IH.t())
    return ffn


def _shared_ffn(spec: LayerSpec, weights: ReferenceWeights) -> Optional[nn.Sequential]:
    if not spec.n_shared:
        return None
    return _load_ffn(gelu_ffn(spec.hidden, spec.n_shared * spec.ffn), weights.shared_up_WH.t(),
                     weights.shared_down_HW.t())


def _finish(module: nn.Module, inputs_cpu: tuple[torch.Tensor, ...], out_rows: tuple[int, ...],
            ctx: RankContext, dropped: Callable[[nn.Module, tuple], Optional[float]]) -> BuiltImpl:
    """Move to the context's device and dtype; make leaf inputs and fixed output gradients."""
    module = module.to(device=ctx.device, dtype=ctx.dtype)
    inputs = tuple(x.to(device=ctx.device, dtype=ctx.dtype).requires_grad_() for x in inputs_cpu)
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    hidden = inputs_cpu[0].shape[1]
    grads = tuple((torch.randn(rows, hidden, generator=gen) / rows).to(device=ctx.device, dtype=ctx.dtype)
                  for rows in out_rows)
    return BuiltImpl(module, inputs, grads, lambda: dropped(module, inputs))


# ----------------------------------------------------------------- builders
def moe_ep_config(spec: LayerSpec, recompute_experts: bool = False, **fields) -> MoEConfig:
    """moe_ep computing DeepSpeed's function: softmax, gates renormalised over the K chosen experts,
    expert capacity ``cf`` ranked as DeepSpeed ranks (k <= 2: ``position``; k > 2: ``affinity``).
    ``fields``: further ``MoEConfig`` fields (routing method, groups, dispatcher)."""
    return MoEConfig(hidden_size=spec.hidden, moe_intermediate_size=spec.ffn, n_routed_experts=spec.n_experts,
                     num_experts_per_tok=spec.top_k, n_shared_experts=spec.n_shared, activation="gelu",
                     scoring_func="softmax", norm_topk_prob=True, expert_capacity_factor=spec.capacity_factor,
                     drop_policy="position" if spec.top_k <= 2 else "affinity", recompute_experts=recompute_experts,
                     **fields)


def _moe_ep_dropped(layer: MoELayer, inputs: tuple) -> float:
    with torch.no_grad():
        layer(*inputs)
    stats = layer.last_stats  # global over the EP group
    return float(stats.dropped_pairs) / float(stats.routed_pairs)


def build_moe_ep(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext, x_TH: torch.Tensor,
                 recompute_experts: bool = False, **fields) -> BuiltImpl:
    layer = MoELayer(moe_ep_config(spec, recompute_experts, **fields), parallel=ctx.parallel)
    first, last = ctx.parallel.expert_range(spec.n_experts)
    state = layer.state_dict()
    state.update({"router.weight": weights.router_EH, "experts.w_in": weights.w_in_EHI[first:last],
                  "experts.w_out": weights.w_out_EIH[first:last]})
    if spec.n_shared:
        state.update({"shared_experts.up_proj.weight": weights.shared_up_WH,
                      "shared_experts.down_proj.weight": weights.shared_down_HW})
    layer.load_state_dict(state)
    return _finish(layer, (x_TH,), (x_TH.shape[0],), ctx, _moe_ep_dropped)


def _deepspeed_dropped(module: RoutedPlusShared, inputs: tuple) -> float:
    gate = module.routed.deepspeed_moe.gate
    with torch.no_grad():
        routes = gate(inputs[0], None, True)[3]  # [K, T] expert ids, -1 where the capacity evicted the pair
    return float((routes < 0).float().mean())


def build_deepspeed(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext, x_TH: torch.Tensor) -> BuiltImpl:
    """DeepSpeed's MoE (import needs ``DS_ACCELERATOR`` set before, as the launcher does)."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    deepspeed.init_distributed(dist_backend=ctx.backend)
    moe = MoE(hidden_size=spec.hidden, expert=gelu_ffn(spec.hidden, spec.ffn), num_experts=spec.n_experts,
              ep_size=ctx.ep, k=spec.top_k, capacity_factor=spec.capacity_factor,
              eval_capacity_factor=spec.capacity_factor, min_capacity=0, drop_tokens=True,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    first = dist.get_rank(group=moe.deepspeed_moe.ep_group) * (spec.n_experts // ctx.ep)  # DeepSpeed's EP rank
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(weights.router_EH)
    for local, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        _load_ffn(expert, weights.w_in_EHI[first + local], weights.w_out_EIH[first + local])
    module = RoutedPlusShared(moe, _shared_ffn(spec, weights))
    return _finish(module, (x_TH,), (x_TH.shape[0],), ctx, _deepspeed_dropped)


def build_textbook(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext, x_TH: torch.Tensor) -> BuiltImpl:
    moe = TextbookMoE(spec.hidden, spec.ffn, spec.n_experts, spec.top_k, spec.capacity_factor)
    with torch.no_grad():
        moe.gate.weight.copy_(weights.router_EH)
    for e, expert in enumerate(moe.experts):
        _load_ffn(expert, weights.w_in_EHI[e], weights.w_out_EIH[e])
    module = RoutedPlusShared(moe, _shared_ffn(spec, weights))
    return _finish(module, (x_TH,), (x_TH.shape[0],), ctx, lambda m, inputs: m.routed.dropped_fraction(inputs[0]))


def _build_bound(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext, x_TH: torch.Tensor,
                 experts: range) -> BuiltImpl:
    """The T*K rows through one GELU FFN per expert of ``experts`` (its weights), on near-equal shares."""
    ffns = nn.ModuleList(_load_ffn(gelu_ffn(spec.hidden, spec.ffn), weights.w_in_EHI[e], weights.w_out_EIH[e])
                         for e in experts)
    x_rows = x_TH.repeat_interleave(spec.top_k, dim=0)
    rows = tuple(FFNsOverShares.shares(x_rows.shape[0], len(ffns)))
    inputs, rows = ((x_rows, x_TH), rows + (x_TH.shape[0],)) if spec.n_shared else ((x_rows,), rows)
    return _finish(FFNsOverShares(ffns, _shared_ffn(spec, weights)), inputs, rows, ctx, lambda m, inputs: None)


def build_dense_bound(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext,
                      x_TH: torch.Tensor) -> BuiltImpl:
    return _build_bound(spec, weights, ctx, x_TH, range(1))  # one FFN over all rows, expert 0's weights


def build_expert_gemm_bound(spec: LayerSpec, weights: ReferenceWeights, ctx: RankContext,
                            x_TH: torch.Tensor) -> BuiltImpl:
    return _build_bound(spec, weights, ctx, x_TH, range(*ctx.parallel.expert_range(spec.n_experts)))


IMPLS: dict[str, Callable[[LayerSpec, ReferenceWeights, RankContext, torch.Tensor], BuiltImpl]] = {
    "moe_ep": build_moe_ep,
    "moe_ep_recompute": partial(build_moe_ep, recompute_experts=True),
    "deepspeed": build_deepspeed,
    "textbook": build_textbook,
    "dense_bound": build_dense_bound,
    "expert_gemm_bound": build_expert_gemm_bound,
}


def rank_input(spec: LayerSpec, rank: int) -> torch.Tensor:
    """This rank's tokens ``[T, H]`` (fp32, CPU), different on every rank."""
    return torch.randn(spec.tokens, spec.hidden, generator=torch.Generator().manual_seed(rank))
