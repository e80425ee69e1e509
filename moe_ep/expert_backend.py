"""Grouped products of the expert FFN and its two passes, with three backends.

Rows are sorted by expert; expert e owns ``counts_E[e]`` consecutive rows.
Every backend provides the two passes of ``moe_ep.expert_ffn``:

    ffn_forward(x_S, row_R, counts, weight_R, w_in, w_out, act, keep_pre) -> y_S, and h_R if kept
    ffn_backward(dy_S, saved..., needs, defer) -> d x_S, d weight_R, d w_in, d w_out

(``defer``: record the weight products' operands through it instead of
multiplying them, which ``wgrad`` / ``wgrad_add`` do later: the overlap
chunks of one layer call, ``moe_ep.expert_ffn.SharedWeightGrads``),

and the grouped products the grouped passes (``_GroupedPasses``) are made of:

    pre(x_S, row_R, counts, w_in)              -> h_R = x_S[row_R] @ w_in[e(r)]
    up(x_S, row_R, counts, w_in, act, scale_R) -> a_R = scale_R * act(h_R), and h_R if kept
    mm(x_R, w, counts)[r]                      =  x_R[r] @ w[e(r)]        (any weight strides)
    wgrad(x_R, dy_R, counts)[e]                =  x_e^T @ dy_e            (zeros for empty experts)
    wgrad_add(x_R, dy_R, counts, out)[e]       += x_e^T @ dy_e            (in place)
    down_backward(dy_R, h_R, w_out, scale_R, counts, act) -> dW_out, dh   (the backward through
        y = (scale * act(h)) W_out, and d scale; moe_ep/activations.py has the formulas)

``workspace`` / ``out`` arguments name an ``[R, H]`` buffer the caller no
longer needs: backends that can write into it do (the gathered rows of
``pre``/``up``, the output of ``mm``), others ignore it. On CPU this matters:
a fresh buffer over glibc's mmap threshold is new pages (page faults) on every
call; a reused one is not, and the large buffers that must be fresh (the
weight gradients, ``h``) are allocated on huge pages (``moe_ep.host_memory``;
docs/performance.md has the numbers).

* ``triton``: ``moe_ep.kernels`` (CUDA; the interpreter on CPU). ``up`` is one
  fused launch: the gather happens on load, the activation and the gate
  weight in the epilogue, and ``h`` is stored only when it is kept.
* ``torch``: ``torch._grouped_mm`` (16-byte aligned strides; its dtypes and
  devices depend on the torch version, ``grouped_mm_problem``); ``up``
  gathers with ``index_select`` first.
* ``loop``: one matmul per expert, any dtype; reads the counts on the host.
  Its forward is the grouped one; its backward runs expert by expert
  (``LoopOps.ffn_backward``), so besides ``h`` and the gradients no buffer
  spans all rows.

``auto`` picks Triton on CUDA for the kernels' dtypes (float32, bfloat16,
float16; ``torch._grouped_mm`` there without Triton, where it runs for the
dtype and strides) and the loop otherwise: for other dtypes (float64) and on
CPU, where the per-expert ``torch.mm`` calls write into the reused workspace
while ``torch._grouped_mm`` allocates every output (slower there in the
profile of docs/performance.md). Empty batches take the loop unless
Triton is asked for (``torch._grouped_mm`` rejects them). An explicit
``triton`` or ``torch`` that cannot run the dtype (or, for ``torch``, this
torch, device or strides) raises ``ValueError`` saying why.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.torch_version import TorchVersion

from . import half_matmul, host_memory
from .activations import activate, activation_grad, scaled_activation
from .kernels.gathered_gemm import gathered_grouped_gemm, gathered_up_projection
from .kernels.grouped_mm import DTYPES as KERNEL_DTYPES
from .kernels.grouped_mm import grouped_gemm, weight_grad
from .kernels.runtime import triton_available

BACKENDS = ("auto", "triton", "torch", "loop")
_BLOCK_ELEMENTS = 1 << 17  # elements of h per block of the loop backend's backward (512 KiB in fp32)
GROUPED_MM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # torch._grouped_mm's from torch 2.9


def _aligned(t: torch.Tensor) -> bool:
    """Every non-unit stride and the innermost extent are 16-byte multiples."""
    size = t.element_size()
    return all(s == 1 or (s * size) % 16 == 0 for s in t.stride()) and (t.shape[-1] * size) % 16 == 0


@functools.lru_cache(maxsize=None)
def grouped_mm_problem(device_type: str, dtype: torch.dtype, capability: Optional[tuple[int, int]] = None,
                       version: str = torch.__version__) -> Optional[str]:
    """Why ``torch._grouped_mm`` of torch ``version`` cannot multiply ``dtype`` on ``device_type``; None if it can.

    torch < 2.8 has no ``torch._grouped_mm``. 2.8 has it for CUDA devices of
    compute capability 9.x, in bfloat16 only. From 2.9 it has a CPU kernel
    too and runs on CUDA from capability 8.0, in float32, float16 and
    bfloat16. ``capability``: the CUDA device's ``(major, minor)`` (needed
    for ``cuda``).
    """
    version = TorchVersion(version)
    if version < (2, 8) or not hasattr(torch, "_grouped_mm"):
        return f"torch {version} has no torch._grouped_mm (added in torch 2.8)"
    since_2_9 = version >= (2, 9)
    dtypes = GROUPED_MM_DTYPES if since_2_9 else (torch.bfloat16,)
    if dtype not in dtypes:
        return f"torch._grouped_mm of torch {version} multiplies {', '.join(map(str, dtypes))}, not {dtype}"
    if device_type == "cpu":
        return None if since_2_9 else f"torch {version} has no CPU kernel of torch._grouped_mm (2.9 has)"
    if device_type != "cuda":
        return f"torch._grouped_mm runs on CPU and CUDA, not {device_type}"
    runs, needed = (capability >= (8, 0), "8.0 or above") if since_2_9 else (capability[0] == 9, "9.x")
    return None if runs else (f"torch._grouped_mm of torch {version} needs CUDA compute capability {needed}; "
                              f"this device has {capability[0]}.{capability[1]}")


def choose_backend(requested: str, device_type: str, dtype: torch.dtype, n_rows: int, *, triton: bool,
                   grouped_mm: Optional[str], aligned: bool) -> str:
    """The backend that runs ``n_rows`` rows of ``dtype`` on ``device_type`` (the module docstring's rules).

    ``triton``: Triton is importable; ``grouped_mm``: ``grouped_mm_problem``
    for this device and dtype; ``aligned``: the operands' strides suit
    ``torch._grouped_mm``. Raises ``ValueError`` for an unknown name and for
    an explicit ``triton`` / ``torch`` that cannot run here.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown expert backend {requested!r}; choose from {BACKENDS}")
    if requested == "triton" and dtype not in KERNEL_DTYPES:
        raise ValueError(f"expert_backend 'triton': the Triton kernels multiply "
                         f"{', '.join(map(str, KERNEL_DTYPES))}, not {dtype}; use 'loop' (or 'auto')")
    if requested == "torch" and grouped_mm is not None:
        raise ValueError(f"expert_backend 'torch': {grouped_mm}; use 'loop' (or 'auto')")
    if requested in ("auto", "torch") and n_rows == 0:
        return "loop"  # torch._grouped_mm rejects empty operands
    if requested == "torch" and not aligned:
        raise ValueError("expert_backend 'torch': torch._grouped_mm needs 16-byte aligned operands (the strides and "
                         "rows of the inputs, of the weights and of their transposes); use 'loop' (or 'auto')")
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "loop"
    if triton and dtype in KERNEL_DTYPES:
        return "triton"
    return "torch" if grouped_mm is None and aligned else "loop"


def resolve_backend(requested: str, x: torch.Tensor, *weights: torch.Tensor, n_rows: Optional[int] = None) -> str:
    """The backend that will run products of ``x`` (source rows) with ``weights`` ([E, in, out] each).

    ``n_rows``: the number of (gathered) rows multiplied, when it differs
    from ``x``'s. ``choose_backend`` with this process's facts.
    """
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    same_dtype = all(w.dtype == x.dtype for w in weights)
    # Forward and backward also multiply by the transposed weights and produce [R, dim] rows of every width.
    aligned = same_dtype and _aligned(x) and all(_aligned(w) and _aligned(w.transpose(1, 2)) for w in weights)
    return choose_backend(requested, x.device.type, x.dtype, x.shape[0] if n_rows is None else n_rows,
                          triton=x.is_cuda and triton_available(),  # only CUDA runs it: no Triton import on CPU
                          grouped_mm=grouped_mm_problem(x.device.type, x.dtype, capability),
                          aligned=aligned)


class _GroupedPasses:
    """``ffn_forward`` / ``ffn_backward`` of moe_ep.expert_ffn from the backend's products over all rows at once.

    Each pass allocates one ``[R, H]`` workspace and reuses it for every ``[R, H]`` step (forward: the gathered
    rows, then the outputs; backward: ``dY_R``, the re-gathered rows, then ``dx_R``), so at most one such buffer
    is alive; backward holds at most three ``[R, I]`` buffers (``h``, ``dA~``, the activation).
    """

    def ffn_forward(self, x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor, weight_R: torch.Tensor,
                    w_in: torch.Tensor, w_out: torch.Tensor, activation: str,
                    keep_pre: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(y_S, h_R if keep_pre else None)``: the formula of moe_ep.expert_ffn."""
        rows_RH = host_memory.empty((row_R.shape[0], x_SH.shape[1]), x_SH)  # gathered rows, then the outputs
        a_RI, h_RJ = self.up(x_SH, row_R, counts_E, w_in, activation, weight_R, keep_pre=keep_pre, workspace=rows_RH)
        y_RH = self.mm(a_RI, w_out, counts_E, out=rows_RH)
        del a_RI
        return x_SH.new_zeros(x_SH.shape).index_add_(0, row_R, y_RH), h_RJ

    def ffn_backward(self, dy_SH: torch.Tensor, x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor,
                     weight_R: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, h_RJ: Optional[torch.Tensor],
                     activation: str, needs: tuple[bool, bool, bool, bool],
                     defer: Optional[Callable] = None) -> tuple[Optional[torch.Tensor], ...]:
        """``(d x, d weight, d w_in, d w_out)`` (``d weight`` in x's dtype), None where ``needs`` (the same four
        flags) is False; ``h_RJ`` None: recompute it. ``defer(name, x_R, dy_R, counts)``: called with the
        operands of the weight products (``w_out``, then ``w_in``) instead of multiplying them; ``d w_in`` and
        ``d w_out`` are then None (the operands keep buffers of their own: no shared workspace)."""
        need_x, need_weight, need_w_in, need_w_out = needs
        rows_RH = host_memory.empty((row_R.shape[0], x_SH.shape[1]), x_SH) if defer is None else None  # dY, x, dx
        if h_RJ is None:  # not kept: the routed experts' activation checkpointing
            h_RJ = self.pre(x_SH, row_R, counts_E, w_in, workspace=rows_RH)
        scale_R1 = weight_R.to(x_SH.dtype)[:, None]  # the gate weights as the forward applied them
        dy_RH = torch.index_select(dy_SH, 0, row_R, out=rows_RH)
        d_weight = x_SH.new_empty(row_R.shape[0]) if need_weight else None
        d_w_out, dh_RJ = self.down_backward(dy_RH, h_RJ, w_out, scale_R1, counts_E, activation, d_weight, need_w_out,
                                            self.wgrad if defer is None else functools.partial(defer, "w_out"))
        del dy_RH, h_RJ
        wgrad_in = self.wgrad if defer is None else functools.partial(defer, "w_in")
        d_w_in = wgrad_in(torch.index_select(x_SH, 0, row_R, out=rows_RH), dh_RJ, counts_E) if need_w_in else None
        d_x = None
        if need_x:
            dx_RH = self.mm(dh_RJ, w_in.transpose(1, 2), counts_E, out=rows_RH)
            d_x = torch.zeros_like(x_SH).index_add_(0, row_R, dx_RH)
        return d_x, d_weight, d_w_in, d_w_out

    def down_backward(self, dy_RH: torch.Tensor, h_RJ: torch.Tensor, w_out: torch.Tensor, scale_R1: torch.Tensor,
                      counts_E: torch.Tensor, activation: str, d_weight_R: Optional[torch.Tensor],
                      need_w_out: bool, wgrad: Callable) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``(dW_out or None, dh)`` for ``y = (scale * act(h)) W_out`` given ``dY``; ``d scale`` into ``d_weight_R``;
        ``wgrad``: ``self.wgrad``, or a recorder of its operands (``ffn_backward``'s ``defer``).

            dA~ = dY W_out^T    d scale = <dA~, act(h)>    dW_out[e] = (scale act(h))_e^T dY_e    dh = act'(h) scale dA~
        """
        da_RI = self.mm(dy_RH, w_out.transpose(1, 2), counts_E)
        act_RI = scaled_activation(h_RJ, da_RI, scale_R1, activation, d_weight_R)
        d_w_out = wgrad(act_RI, dy_RH, counts_E) if need_w_out else None
        del act_RI
        return d_w_out, activation_grad(h_RJ, da_RI.mul_(scale_R1), activation)

    def wgrad_add(self, x_RK: torch.Tensor, dy_RN: torch.Tensor, counts_E: torch.Tensor, out_EKN: torch.Tensor) -> None:
        """``out[e] += x_e^T @ dy_e``: the product, then one add (backends that can accumulate in place override it)."""
        out_EKN.add_(self.wgrad(x_RK, dy_RN, counts_E))


class _GatherThenUp:
    """``up`` and ``pre`` for backends without a fused kernel: gather the rows, then multiply."""

    def pre(self, x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor, w_in: torch.Tensor,
            workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
        x_RH = torch.index_select(x_SH, 0, row_R, out=workspace) if workspace is not None \
            else x_SH.index_select(0, row_R)
        return self.mm(x_RH, w_in, counts_E)

    def up(self, x_SH: torch.Tensor, row_R: torch.Tensor, counts_E: torch.Tensor, w_in: torch.Tensor,
           activation: str, scale_R: torch.Tensor, keep_pre: bool,
           workspace: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        h_RJ = self.pre(x_SH, row_R, counts_E, w_in, workspace)
        # the scale in the rows' dtype: a mixed-dtype in-place multiply takes a slow casting path on CPU
        a_RI = activate(h_RJ, activation, overwrite=not keep_pre).mul_(scale_R.to(h_RJ.dtype)[:, None])
        return a_RI, (h_RJ if keep_pre else None)


def _expert_blocks(sizes: list[int], width: int) -> list[tuple[int, int, int, int]]:
    """Consecutive experts in blocks of at least ``_BLOCK_ELEMENTS / width`` rows (the last block may have fewer):
    ``(first expert, end expert, first row, end row)`` of each."""
    min_rows = max(1, _BLOCK_ELEMENTS // max(1, width))
    blocks, first, lo, hi = [], 0, 0, 0
    for e, n in enumerate(sizes):
        hi += n
        if hi - lo >= min_rows or e == len(sizes) - 1:
            blocks.append((first, e + 1, lo, hi))
            first, lo = e + 1, hi
    return blocks


def _mm_per_expert(x_RK: torch.Tensor, w_EKN: torch.Tensor, sizes: list[int], out_RN: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r] @ w[e(r)]``, one product per expert into ``out`` (``half_matmul``: float32 for half
    dtypes on a CPU without a half matmul)."""
    for w_KN, x_e, out_e in zip(w_EKN.unbind(0), x_RK.split(sizes), out_RN.split(sizes)):
        half_matmul.mm_into(x_e, w_KN, out_e)
    return out_RN


def _wgrad_per_expert(x_RK: torch.Tensor, dy_RN: torch.Tensor, sizes: list[int], out_EKN: torch.Tensor,
                      accumulate: bool = False) -> None:
    """``out[e] = x_e^T @ dy_e`` (zeros for an expert without rows), or ``out[e] += x_e^T @ dy_e`` when
    ``accumulate`` (in place), one GEMM per expert (``half_matmul``, as ``_mm_per_expert``)."""
    for out_KN, x_e, dy_e in zip(out_EKN.unbind(0), x_RK.split(sizes), dy_RN.split(sizes)):
        if accumulate:
            half_matmul.addmm_(out_KN, x_e.t(), dy_e)
        else:
            half_matmul.mm_into(x_e.t(), dy_e, out_KN)


class LoopOps(_GatherThenUp, _GroupedPasses):
    """One ``torch.mm`` per expert (host reads of the counts); the backward in blocks of experts (``ffn_backward``)."""

    def mm(self, x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E: torch.Tensor,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out_RN = host_memory.empty((x_RK.shape[0], w_EKN.shape[-1]), x_RK) if out is None else out
        return _mm_per_expert(x_RK, w_EKN, counts_E.tolist(), out_RN)  # one host read

    def wgrad(self, x_RK: torch.Tensor, dy_RN: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dw_EKN = host_memory.empty((counts_E.numel(), x_RK.shape[1], dy_RN.shape[1]), x_RK)
        _wgrad_per_expert(x_RK, dy_RN, counts_E.tolist(), dw_EKN)
        return dw_EKN

    def wgrad_add(self, x_RK, dy_RN, counts_E, out_EKN):
        _wgrad_per_expert(x_RK, dy_RN, counts_E.tolist(), out_EKN, accumulate=True)

    def ffn_backward(self, dy_SH, x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ, activation, needs,
                     defer=None):
        """As ``_GroupedPasses.ffn_backward``, one block of consecutive experts at a time (``_expert_blocks``:
        at least ``_BLOCK_ELEMENTS`` elements of ``h`` each, so the element-wise steps are not paid per tiny
        expert): the block's rows of ``dY`` and ``x`` are gathered and go through the whole backward (``dA~``, the
        activation, ``dW_out``, ``dh``, ``dW_in``, ``dx``, the products one expert at a time) and are added into
        ``d x`` before the next block's. Besides ``h`` and the gradients no buffer spans all rows (with ``h_RJ``
        None, ``h`` is recomputed one block at a time too). With ``defer``, ``_GroupedPasses.ffn_backward``: the
        recorded operands span all rows anyway."""
        if defer is not None:
            return super().ffn_backward(dy_SH, x_SH, row_R, counts_E, weight_R, w_in, w_out, h_RJ, activation,
                                        needs, defer)
        need_x, need_weight, need_w_in, need_w_out = needs
        sizes = counts_E.tolist()  # one host read
        d_x = torch.zeros_like(x_SH) if need_x else None
        d_weight = x_SH.new_empty(row_R.shape[0]) if need_weight else None
        d_w_in = host_memory.empty(w_in.shape, w_in) if need_w_in else None
        d_w_out = host_memory.empty(w_out.shape, w_out) if need_w_out else None
        scale_R1 = weight_R.to(x_SH.dtype)[:, None]  # the gate weights as the forward applied them
        J, I = w_in.shape[2], w_out.shape[1]
        for first, end, lo, hi in _expert_blocks(sizes, J):
            block, row_b, scale_b = sizes[first:end], row_R[lo:hi], scale_R1[lo:hi]
            x_b = None
            if h_RJ is None:
                x_b = x_SH.index_select(0, row_b)
                h_b = _mm_per_expert(x_b, w_in[first:end], block, x_SH.new_empty(hi - lo, J))
            else:
                h_b = h_RJ[lo:hi]
            dy_b = dy_SH.index_select(0, row_b)
            da_b = _mm_per_expert(dy_b, w_out[first:end].transpose(1, 2), block, dy_b.new_empty(hi - lo, I))
            act_b = scaled_activation(h_b, da_b, scale_b, activation, None if d_weight is None else d_weight[lo:hi],
                                      dot_chunk_elements=_BLOCK_ELEMENTS // 4)
            if need_w_out:
                _wgrad_per_expert(act_b, dy_b, block, d_w_out[first:end])
            del act_b
            dh_b = activation_grad(h_b, da_b.mul_(scale_b), activation)
            del da_b, h_b  # with GELU dh is written over dA~
            if need_w_in:  # x's rows gathered only now: fewer rows of the block alive at once
                x_b = x_SH.index_select(0, row_b) if x_b is None else x_b
                _wgrad_per_expert(x_b, dh_b, block, d_w_in[first:end])
            del x_b
            if need_x:  # dx rows into dY's buffer, which is done with
                d_x.index_add_(0, row_b, _mm_per_expert(dh_b, w_in[first:end].transpose(1, 2), block, dy_b))
            del dh_b, dy_b  # before the next block's buffers
        return d_x, d_weight, d_w_in, d_w_out


class TorchOps(_GatherThenUp, _GroupedPasses):
    """``torch._grouped_mm`` with int32 offsets (no host sync).

    On CPU the weight gradient is the per-expert loop: ``torch._grouped_mm``'s
    ``[K, R] x [R, N]`` form is slower than the loop there (docs/performance.md),
    and a host read of the counts costs nothing on CPU.
    """

    @staticmethod
    def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(counts_E, 0).to(torch.int32)

    def mm(self, x_RK, w_EKN, counts_E, out=None):
        return torch._grouped_mm(x_RK, w_EKN, offs=self._offsets(counts_E))  # no out= variant

    def wgrad(self, x_RK, dy_RN, counts_E):
        if x_RK.device.type == "cpu":
            return _OPS["loop"].wgrad(x_RK, dy_RN, counts_E)
        return torch._grouped_mm(x_RK.t(), dy_RN, offs=self._offsets(counts_E))

    def wgrad_add(self, x_RK, dy_RN, counts_E, out_EKN):
        if x_RK.device.type == "cpu":
            return _OPS["loop"].wgrad_add(x_RK, dy_RN, counts_E, out_EKN)
        return super().wgrad_add(x_RK, dy_RN, counts_E, out_EKN)


class TritonOps(_GroupedPasses):
    """``moe_ep.kernels``: gather on load (+ activation + gate weight) launches, grouped GEMM, weight gradient."""

    def mm(self, x_RK, w_EKN, counts_E, out=None):
        return grouped_gemm(x_RK, w_EKN, counts_E, out=out)

    def wgrad(self, x_RK, dy_RN, counts_E):
        return weight_grad(x_RK, dy_RN, counts_E)

    def pre(self, x_SH, row_R, counts_E, w_in, workspace=None):  # gathers on load: no buffer
        return gathered_grouped_gemm(x_SH, row_R, counts_E, w_in)

    def up(self, x_SH, row_R, counts_E, w_in, activation, scale_R, keep_pre, workspace=None):
        return gathered_up_projection(x_SH, row_R, counts_E, w_in, activation, scale_R.float(), store_pre=keep_pre)


_OPS = {"triton": TritonOps(), "torch": TorchOps(), "loop": LoopOps()}


def grouped_ops(requested: str, x_SH: torch.Tensor, n_rows: int, *weights: torch.Tensor):
    """The ops object of the backend ``resolve_backend`` picks for ``n_rows`` rows gathered from ``x_SH``."""
    return _OPS[resolve_backend(requested, x_SH, *weights, n_rows=n_rows)]
