"""Compile every kernel variant ahead of time for an H100 (sm_90) and print a JSON summary.

Run as a script in a process WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces
``@triton.jit`` functions, which then cannot be compiled). Each variant is specialised
as a JIT launch on contiguous bf16 operands would be: unit strides constexpr, every
pointer and other size marked 16-divisible. Needs no GPU: Triton's bundled ptxas
produces the cubin.
"""
import json
import warnings

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_ep.kernels import grouped_gemm_triton as kernels

BLOCK_M, BLOCK_N, BLOCK_K, STAGES = 64, 128, 64, 3


def _compile(fn, runtime_args: dict, constexprs: dict):
    signature = {**runtime_args, **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in runtime_args if n != "num_experts"}
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": STAGES})


def forward_kernel(gather=False, activation=None, row_scale=False, store_pre=False, transposed_w=False):
    runtime = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "counts_ptr": "*i64",
               "num_experts": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_be": "i32",
               "stride_om": "i32", ("stride_bn" if transposed_w else "stride_bk"): "i32"}
    const = {"stride_ak": 1, "stride_on": 1, ("stride_bk" if transposed_w else "stride_bn"): 1,
             "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "BLOCK_E": 8,
             "GATHER": gather, "ACTIVATION": kernels.ACTIVATIONS[activation], "STORE_PRE": store_pre,
             "ROW_SCALE": row_scale, "UPCAST": False, "DOT_PRECISION": None}
    if store_pre:
        runtime.update(pre_ptr="*bf16", stride_pm="i32")
        const["stride_pn"] = 1
    else:
        const.update(pre_ptr=None, stride_pm=0, stride_pn=0)
    for name, used, kind in (("row_index_ptr", gather, "*i64"), ("row_scale_ptr", row_scale, "*fp32")):
        if used:
            runtime[name] = kind
        else:
            const[name] = None
    return _compile(kernels._grouped_gemm_kernel, runtime, const)


def weight_grad_kernel():
    runtime = {"a_ptr": "*bf16", "g_ptr": "*bf16", "dw_ptr": "*bf16", "counts_ptr": "*i64",
               "num_experts": "i32", "K": "i32", "N": "i32", "stride_am": "i32", "stride_gm": "i32",
               "stride_de": "i32", "stride_dk": "i32"}
    const = {"stride_ak": 1, "stride_gn": 1, "stride_dn": 1, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
             "BLOCK_K": BLOCK_K, "BLOCK_E": 8, "UPCAST": False, "DOT_PRECISION": None}
    return _compile(kernels._weight_grad_kernel, runtime, const)


# name -> (build, bf16 elements of operand tiles per K step)
VARIANTS = {
    "forward": (forward_kernel, BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N),
    "forward_transposed_w": (lambda: forward_kernel(transposed_w=True), BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N),
    "forward_gather_swiglu_scale_pre": (
        lambda: forward_kernel(gather=True, activation="swiglu", row_scale=True, store_pre=True),
        BLOCK_M * BLOCK_K + 2 * BLOCK_K * BLOCK_N),
    "forward_gather_gelu_scale": (lambda: forward_kernel(gather=True, activation="gelu", row_scale=True),
                                  BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N),
    "forward_row_scale": (lambda: forward_kernel(row_scale=True), BLOCK_M * BLOCK_K + BLOCK_K * BLOCK_N),
    "weight_grad": (weight_grad_kernel, BLOCK_K * BLOCK_M + BLOCK_M * BLOCK_N),
}


def main() -> None:
    summary = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (build, stage_elements) in VARIANTS.items():
            compiled = build()
            summary[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                             "wgmma": "warp_group_dot" in compiled.asm["ttgir"],
                             "shared_bytes": compiled.metadata.shared,
                             "stage_bytes": 2 * stage_elements}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
