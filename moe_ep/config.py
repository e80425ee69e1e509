"""``MoEConfig``: every knob of an MoE layer, validated, with paper presets.

Field names follow transformers' DeepSeek configs where one exists
(``n_routed_experts``, ``num_experts_per_tok``, ``n_group``, ``topk_group``,
``routed_scaling_factor``, ``norm_topk_prob``), so ``from_hf_config`` is a
rename, not a translation. The formulas behind each option are in
docs/routing.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .activations import ACTIVATIONS
from .precision import DTYPES
from .expert_backend import BACKENDS as EXPERT_BACKENDS

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "device_limited", "node_limited")
LOSS_SCOPES = ("sequence", "batch")
DROP_POLICIES = ("affinity", "position")
DISPATCHERS = ("auto", "flat", "hierarchical")
_KINDS = {int: "an int", float: "a number", bool: "a bool", str: "a string"}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (type, None allowed)}`` from a dataclass's annotations (``X``, ``Optional[X]`` or ``X | None``)."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        if type(None) in args:
            (hint,) = [arg for arg in args if arg is not type(None)]
        out[name] = hint, type(None) in args
    return out


def _has_type(value: Any, kind: type) -> bool:
    """``isinstance`` where a bool is no number (Python makes it an int) and an int is a valid float."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def check_field_types(config: Any) -> None:
    """Raise ``ValueError`` ``<Class>.<field>: must be <type>, got <value> (<its type>)`` for the first field of
    the dataclass ``config`` whose value does not have its annotated type (``_has_type``)."""
    types = _field_types(type(config))
    for field in dataclasses.fields(config):
        kind, optional = types[field.name]
        value = getattr(config, field.name)
        if not (value is None and optional) and not _has_type(value, kind):
            expected = _KINDS.get(kind, kind.__name__) + (" or None" if optional else "")
            raise ValueError(f"{type(config).__name__}.{field.name}: must be {expected}, got {value!r} "
                             f"({type(value).__name__})")


def _refuse_unknown_fields(where: str, names: Any) -> None:
    unknown = set(names) - {f.name for f in dataclasses.fields(MoEConfig)}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer.

    Shape:
        hidden_size: model width H.
        moe_intermediate_size: intermediate width I of one routed expert
            (fine-grained experts: the dense FFN width divided by m).
        n_routed_experts: N_r, routed experts in the layer.
        n_shared_experts: N_s, always-active experts, run as one FFN of width
            ``n_shared_experts * shared_intermediate_size``.
        shared_intermediate_size: width of one shared expert (default: I).
        num_experts_per_tok: K_r, routed experts per token.
        activation: ``swiglu`` (DeepSeek: w2(silu(w1 x) * w3 x)) or ``gelu``
            (classic MoE: w2(gelu(w1 x))).

    Routing:
        scoring_func: ``softmax`` (DeepSeekMoE, V2, Switch, GShard) or
            ``sigmoid`` (V3).
        topk_method: ``greedy`` (plain top-K), ``device_limited`` (V2: groups
            ranked by their best expert) or ``node_limited`` (V3: groups ranked
            by the sum of their top ``group_score_topk`` biased scores).
        n_group: routing groups (devices for V2, nodes for V3); contiguous
            blocks of expert ids.
        topk_group: M, groups a token may reach.
        group_score_topk: ``node_limited`` only: how many of a group's best
            biased scores are summed into its score. None: K_r / M (Megatron);
            DeepSeek-V3's code and transformers use 2 (``from_hf_config``
            sets 2 for V3). Ignored by the other methods.
        norm_topk_prob: divide the selected gate values by their sum.
        routed_scaling_factor: multiply gate values by this (V2 16.0, V3 2.5).
        router_dtype: dtype of the router matmul and scores (fp32 default).
        router_jitter: multiplicative input noise ``U(1-eps, 1+eps)`` in
            training (Switch); 0 disables it.

    Balancing:
        aux_free_bias: keep a V3 selection bias b (a buffer, never a gradient).
        bias_update_rate: gamma of ``b += gamma * sign(mean(load) - load)``.
        expert_balance_coef: alpha_1, DeepSeekMoE/V2 expert-level loss.
        device_balance_coef: alpha_2, device-level loss over D device groups.
        comm_balance_coef: alpha_3, V2 communication loss.
        seq_balance_coef: alpha, V3 complementary sequence-wise loss.
        switch_coef: alpha of the Switch/GShard top-1 loss.
        z_loss_coef: router z-loss (ST-MoE) coefficient.
        loss_scope: ``sequence`` (the papers' T = tokens of one sequence) or
            ``batch`` (T = every token of the global batch); the V3
            sequence-wise loss is always per sequence.
        device_groups: D for the device-level loss, communication loss and
            device-level dropping; default: the expert-parallel size when the
            layer is sharded, else ``n_group``.

    Dropping (training only unless ``eval_capacity_factor`` is set):
        expert_capacity_factor: per-expert capacity
            ``ceil(cf * T * K_r / N_r)`` (GShard/Switch); None: no limit.
        device_capacity_factor: V2 per-device budget
            ``ceil(cf * T * K_r / D)`` pairs; None: no limit.
        drop_policy: ``affinity`` drops the lowest-affinity pairs first (V2,
            V-MoE); ``position`` drops the latest pairs, all first choices
            ahead of any second choice (GShard).
        protected_seq_frac: fraction of sequences never dropped (V2: 0.1).
        eval_capacity_factor: capacity factor applied to both limits in eval;
            None means no dropping in eval (V2).

    Dispatch (expert-parallel layers only; docs/dispatch.md):
        dispatcher: ``flat`` (one all-to-all over the EP group),
            ``hierarchical`` (two hops: once per destination node across
            nodes, then inside the node) or ``auto`` (hierarchical when the
            EP group spans more than one node, ``ParallelState.nodes > 1``,
            with more than one rank per node).
        overlap_chunks: c, the token chunks the dispatch pipelines: after
            the keep decisions each rank's tokens are split into c
            contiguous chunks, and the first hop of chunk i + 1 and the
            combine of chunk i - 1 are in flight while chunk i's experts run
            (backward: the mirror order). 1: one pass, no pipelining. The
            results equal c = 1's up to the order of floating-point sums.
        redundant_experts: R, extra physical expert slots per EP group for
            expert-parallel load balancing (docs/eplb.md): the layer holds
            ``(n_routed_experts + R) / ep_size`` slots per rank, some of them
            replicas of hot experts, placed by ``moe_ep.eplb.plan_placement``
            (a multiple of the EP size). Routing, gates, balance losses, the
            V3 bias and dropping stay defined on the logical experts; only
            where a pair is computed changes. 0: one slot per expert, expert e
            on EP rank ``e // (n_routed_experts / ep_size)`` (unless a plan is
            set with ``MoELayer.set_placement``).
        sync_free: no host read in forward or backward, so ``torch.compile``
            (``fullgraph=True``) and CUDA graphs take the whole layer
            (moe_ep/dispatch/padded.py). Needs ``expert_capacity_factor``:
            every buffer is sized by a per-sender expert capacity
            ``ceil(cf * T * K / E)`` of this rank's T tokens (``[E_local *
            capacity, H]`` per sender, padded), which applies in eval too
            (``eval_capacity_factor``, else the training factors); pairs
            beyond it, protected ones included, are dropped and counted on
            the device. Every EP rank must pass the same number of tokens.
            One padded all-to-all over the EP group, experts as batched
            matmuls: not with ``dispatcher='hierarchical'``,
            ``overlap_chunks > 1``, ``redundant_experts``, ``check_finite``,
            ``recompute_experts`` or an ``expert_backend`` other than ``auto``.

    Checks:
        check_finite: raise ``moe_ep.finite.NonFiniteError`` on every rank when
            any rank's input, router logits or expert outputs hold NaN or Inf
            (one host sync per forward; moe_ep/finite.py).
        expert_backend: ``auto`` (Triton on CUDA in float32, bfloat16 and
            float16; the per-expert loop on CPU and in other dtypes), or force
            ``triton``, ``torch`` (``torch._grouped_mm``) or ``loop``
            (moe_ep/expert_backend.py; a forced backend that cannot run the
            compute dtype raises ``ValueError`` naming it).
        recompute_experts: keep no expert pre-activations for backward and
            recompute them there (one extra grouped GEMM per layer in
            backward, ``[R, J]`` less memory held per layer).
    """

    hidden_size: int = 64
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    n_shared_experts: int = 0
    shared_intermediate_size: Optional[int] = None
    num_experts_per_tok: int = 2
    activation: str = "swiglu"

    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    group_score_topk: Optional[int] = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    router_dtype: str = "float32"
    router_jitter: float = 0.0

    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3
    expert_balance_coef: float = 0.0
    device_balance_coef: float = 0.0
    comm_balance_coef: float = 0.0
    seq_balance_coef: float = 0.0
    switch_coef: float = 0.0
    z_loss_coef: float = 0.0
    loss_scope: str = "sequence"
    device_groups: Optional[int] = None

    expert_capacity_factor: Optional[float] = None
    device_capacity_factor: Optional[float] = None
    drop_policy: str = "affinity"
    protected_seq_frac: float = 0.0
    eval_capacity_factor: Optional[float] = None

    dispatcher: str = "auto"
    overlap_chunks: int = 1
    redundant_experts: int = 0
    sync_free: bool = False

    check_finite: bool = False
    expert_backend: str = "auto"
    recompute_experts: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field of a wrong type or an inconsistent value.

        Types come from the annotations (``check_field_types``): a bool is
        not an int, a string or None is not a number, a number is not a
        string or a bool. Then values and combinations are checked.
        """
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"MoEConfig.{field}: {why}")

        check_field_types(self)
        for name in ("hidden_size", "moe_intermediate_size", "n_routed_experts",
                     "num_experts_per_tok", "n_group", "topk_group"):
            value = getattr(self, name)
            need(value > 0, name, f"must be a positive int, got {value!r}")
        need(self.n_shared_experts >= 0, "n_shared_experts",
             f"must be a non-negative int, got {self.n_shared_experts!r}")
        if self.shared_intermediate_size is not None:
            need(self.shared_intermediate_size > 0, "shared_intermediate_size",
                 f"must be a positive int or None, got {self.shared_intermediate_size!r}")
        need(self.activation in ACTIVATIONS, "activation", f"unknown {self.activation!r}; choose from {ACTIVATIONS}")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func",
             f"unknown {self.scoring_func!r}; choose from {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method",
             f"unknown {self.topk_method!r}; choose from {TOPK_METHODS}")
        need(self.router_dtype in DTYPES, "router_dtype",
             f"unknown {self.router_dtype!r}; choose from {tuple(DTYPES)}")
        need(self.loss_scope in LOSS_SCOPES, "loss_scope", f"unknown {self.loss_scope!r}; choose from {LOSS_SCOPES}")
        need(self.drop_policy in DROP_POLICIES, "drop_policy",
             f"unknown {self.drop_policy!r}; choose from {DROP_POLICIES}")
        need(self.expert_backend in EXPERT_BACKENDS, "expert_backend",
             f"unknown {self.expert_backend!r}; choose from {EXPERT_BACKENDS}")
        need(self.dispatcher in DISPATCHERS, "dispatcher", f"unknown {self.dispatcher!r}; choose from {DISPATCHERS}")
        need(self.overlap_chunks >= 1, "overlap_chunks", f"must be a positive int, got {self.overlap_chunks!r}")
        need(self.redundant_experts >= 0, "redundant_experts",
             f"must be a non-negative int, got {self.redundant_experts!r}")

        E, K = self.n_routed_experts, self.num_experts_per_tok
        need(K <= E, "num_experts_per_tok", f"top-k {K} exceeds n_routed_experts {E}")
        need(E % self.n_group == 0, "n_routed_experts",
             f"{E} experts are not divisible into n_group={self.n_group} groups")
        need(self.topk_group <= self.n_group, "topk_group",
             f"topk_group {self.topk_group} exceeds n_group {self.n_group}")
        if self.topk_method != "greedy":
            reachable = self.topk_group * (E // self.n_group)
            need(K <= reachable, "num_experts_per_tok",
                 f"top-k {K} exceeds the {reachable} experts reachable in topk_group={self.topk_group} "
                 f"of n_group={self.n_group} groups")
        if self.group_score_topk is not None:
            need(0 < self.group_score_topk <= E // self.n_group,
                 "group_score_topk", f"must be a positive int of at most the {E // self.n_group} experts of a "
                 f"group (n_routed_experts / n_group), got {self.group_score_topk!r}")
        elif self.topk_method == "node_limited":
            need(K >= self.topk_group, "num_experts_per_tok",
                 f"node-limited scoring sums the top K/M = {K}//{self.topk_group} scores per group, "
                 f"which is 0 when num_experts_per_tok < topk_group; set group_score_topk")
        if self.device_groups is not None:
            need(self.device_groups > 0, "device_groups", f"must be a positive int, got {self.device_groups!r}")
            need(E % self.device_groups == 0, "device_groups",
                 f"{E} experts are not divisible into device_groups={self.device_groups}")

        for name in ("bias_update_rate", "expert_balance_coef", "device_balance_coef", "comm_balance_coef",
                     "seq_balance_coef", "switch_coef", "z_loss_coef", "router_jitter"):
            value = getattr(self, name)
            need(math.isfinite(value) and value >= 0, name, f"must be a finite non-negative number, got {value!r}")
        need(self.router_jitter < 1, "router_jitter", "must be below 1")
        need(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0, "routed_scaling_factor",
             f"must be a finite positive number, got {self.routed_scaling_factor!r}")
        for name in ("expert_capacity_factor", "device_capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None:
                need(value > 0 and math.isfinite(value), name, f"must be positive or None, got {value!r}")
        need(0.0 <= self.protected_seq_frac <= 1.0, "protected_seq_frac",
             f"must lie in [0, 1], got {self.protected_seq_frac!r}")
        if self.sync_free:
            need(self.expert_capacity_factor is not None, "sync_free",
                 "needs expert_capacity_factor: every buffer is sized by the expert capacity")
            for name, conflict in (("dispatcher", self.dispatcher == "hierarchical"),
                                   ("overlap_chunks", self.overlap_chunks > 1),
                                   ("redundant_experts", self.redundant_experts > 0),
                                   ("check_finite", self.check_finite),
                                   ("recompute_experts", self.recompute_experts),
                                   ("expert_backend", self.expert_backend != "auto")):
                need(not conflict, name, f"{getattr(self, name)!r} is not available with sync_free=True (one padded "
                                         f"all-to-all, experts as batched matmuls, no host read)")

    # --------------------------------------------------------------- derived
    @property
    def torch_router_dtype(self) -> torch.dtype:
        return DTYPES[self.router_dtype]

    @property
    def group_score_k(self) -> int:
        """Biased scores summed per group by ``node_limited``: ``group_score_topk`` or K_r // M."""
        return self.group_score_topk or self.num_experts_per_tok // self.topk_group

    @property
    def shared_width(self) -> int:
        """Total intermediate width of the fused shared-expert FFN."""
        return self.n_shared_experts * (self.shared_intermediate_size or self.moe_intermediate_size)

    def replace(self, **changes: Any) -> "MoEConfig":
        """A validated copy with some fields changed (``ValueError`` for a field that does not exist)."""
        _refuse_unknown_fields("MoEConfig.replace", changes)
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MoEConfig":
        """A paper configuration, optionally scaled down through ``overrides``.

        Known names: ``switch``, ``gshard``, ``deepseek-moe-16b``,
        ``deepseek-v2``, ``deepseek-v2-lite``, ``deepseek-v3``. Values and
        sources are listed in docs/routing.md.
        """
        if name not in PRESETS:
            raise ValueError(f"MoEConfig.preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        _refuse_unknown_fields("MoEConfig.preset", overrides)
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_config(cls, hf_config: Any, **overrides: Any) -> "MoEConfig":
        """Read a transformers ``DeepseekV2Config`` or ``DeepseekV3Config``.

        V2 ``greedy`` maps to ``greedy``, ``group_limited_greedy`` to
        ``device_limited``; V3 (``noaux_tc`` or a V3 config) to
        ``node_limited`` with sigmoid scores, the selection bias and
        ``group_score_topk=2`` (transformers scores a group by its top-2
        biased scores, as DeepSeek's code). ``overrides`` set any field.
        """
        _refuse_unknown_fields("MoEConfig.from_hf_config", overrides)
        return cls(**{**hf_config_fields(hf_config), **overrides})


def hf_config_fields(hf_config: Any) -> dict[str, Any]:
    """The ``MoEConfig`` fields a transformers ``DeepseekV2Config`` / ``DeepseekV3Config`` determines.

    Every other field is moe_ep's own (balance coefficients, capacities,
    dropping, dtypes, backends): transformers has nothing to map it from.
    """
    model_type = getattr(hf_config, "model_type", "")
    n_routed = getattr(hf_config, "n_routed_experts", None) or getattr(hf_config, "num_local_experts", None)
    if n_routed is None:
        raise ValueError(f"from_hf_config: {type(hf_config).__name__} has no n_routed_experts")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"from_hf_config: hidden_act {hf_config.hidden_act!r} is not supported (silu only)")
    fields = dict(
        hidden_size=hf_config.hidden_size,
        moe_intermediate_size=hf_config.moe_intermediate_size,
        n_routed_experts=n_routed,
        n_shared_experts=hf_config.n_shared_experts or 0,
        num_experts_per_tok=hf_config.num_experts_per_tok,
        routed_scaling_factor=float(hf_config.routed_scaling_factor),
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
        n_group=getattr(hf_config, "n_group", None) or 1,
        topk_group=getattr(hf_config, "topk_group", None) or 1,
    )
    topk_method = getattr(hf_config, "topk_method", None)
    if model_type == "deepseek_v3" or topk_method == "noaux_tc":
        fields.update(scoring_func="sigmoid", topk_method="node_limited", aux_free_bias=True, group_score_topk=2)
    elif topk_method == "group_limited_greedy":
        fields.update(scoring_func="softmax", topk_method="device_limited")
    elif topk_method in (None, "greedy"):
        fields.update(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)
    else:
        raise ValueError(f"from_hf_config: unknown topk_method {topk_method!r}")
    return fields


# Values from the papers and official configs; see
# ../shared/reference/deepseek-moe-algorithms.md and docs/routing.md.
PRESETS: dict[str, dict[str, Any]] = {
    # Switch Transformer: top-1 softmax, aux loss alpha 1e-2, capacity 1.25.
    "switch": dict(hidden_size=768, moe_intermediate_size=3072, n_routed_experts=128, num_experts_per_tok=1,
                   activation="gelu", scoring_func="softmax", switch_coef=1e-2, loss_scope="batch",
                   expert_capacity_factor=1.25, drop_policy="position", router_jitter=1e-2),
    # GShard: top-2 softmax, gates renormalised over the two, capacity 1.25 (2.0 in eval).
    "gshard": dict(hidden_size=1024, moe_intermediate_size=8192, n_routed_experts=128, num_experts_per_tok=2,
                   activation="gelu", scoring_func="softmax", norm_topk_prob=True, switch_coef=1e-2,
                   loss_scope="batch", expert_capacity_factor=1.25, eval_capacity_factor=2.0,
                   drop_policy="position"),
    # DeepSeekMoE 16B: 2 shared + 64 routed (6 active), 0.25x FFN experts, alpha_1 = 0.001.
    "deepseek-moe-16b": dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                             n_shared_experts=2, num_experts_per_tok=6, scoring_func="softmax",
                             expert_balance_coef=1e-3),
    # DeepSeek-V2: 2 shared + 160 routed (6 active), D=8, M=3, scale 16, alphas 0.003/0.05/0.02,
    # device-level dropping at capacity 1.0 with ~10% of sequences protected.
    "deepseek-v2": dict(hidden_size=5120, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=2,
                        num_experts_per_tok=6, scoring_func="softmax", topk_method="device_limited", n_group=8,
                        topk_group=3, routed_scaling_factor=16.0, expert_balance_coef=3e-3,
                        device_balance_coef=5e-2, comm_balance_coef=2e-2, device_capacity_factor=1.0,
                        protected_seq_frac=0.1),
    # DeepSeek-V2-Lite: 2 shared + 64 routed (6 active), greedy, alpha_1 = 0.001.
    "deepseek-v2-lite": dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64,
                             n_shared_experts=2, num_experts_per_tok=6, scoring_func="softmax",
                             expert_balance_coef=1e-3),
    # DeepSeek-V3: 1 shared + 256 routed (8 active), sigmoid, 8 groups, 4 kept, scale 2.5,
    # aux-free bias (gamma 1e-3) and sequence-wise loss alpha 1e-4, no dropping.
    "deepseek-v3": dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, scoring_func="sigmoid", topk_method="node_limited", n_group=8,
                        topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, aux_free_bias=True,
                        bias_update_rate=1e-3, seq_balance_coef=1e-4),
}
