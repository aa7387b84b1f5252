"""Compiles htc.layers.roi_align_triton's kernels with Triton's compiler for an sm_90 GPU (H100,
H200), down to the binary, in every variant the model launches; no GPU is needed. Triton's
interpreter, which runs the kernels on CPU in the other tests, executes them as Python and
accepts what the compiler refuses. Run in a process without TRITON_INTERPRET (with it, the
kernels are the interpreter's):

    python tests/layers/compile_triton_kernels.py  # prints one line per variant; rc 1 on failure
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import htc.layers.roi_align_triton as kernels

TABLE = {"rois": "*fp32", "table": "*i32", "scales": "*fp32", "sampling_ratio": "i32"}
SIZES = {name: "i32" for name in ("C", "out_h", "out_w", "num_rois",
                                  "search_steps", "total")}  # fmt: skip


def variants():
    """(kernel, argument types, constexprs): each dtype, with and without a level per RoI."""
    for levels, many in (("*i64", True), ("*fp32", False)):  # one level: ``rois`` stands in
        common = dict(TABLE, **SIZES, levels=levels, offset="fp32")
        for dtype in ("*fp32", "*fp16", "*bf16"):
            types = dict(common, feature=dtype, out=dtype)
            for pool in (1, 2):
                yield kernels._forward_kernel, types, dict(ALIGNED=True, POOL=pool, LEVELS=many,
                                                           BLOCK_C=256)  # fmt: skip
        types = dict(common, ends="*i64", pixel="*i32", cell="*i32", weight="*fp32")
        for pool in (1, 2):
            constexprs = dict(ALIGNED=True, POOL=pool, LEVELS=many, BLOCK=kernels.BLOCK)
            yield kernels._counts_kernel, dict(common, entries="*i64"), constexprs
            yield kernels._entries_kernel, types, constexprs
    for dtype in ("*fp32", "*fp16", "*bf16"):
        types = dict(row_start="*i64", order="*i64", cells="*i32", weights="*fp32",
                     grad_out=dtype, grad_in=dtype, C="i32")  # fmt: skip
        yield kernels._backward_kernel, types, dict(BLOCK_C=256, BLOCK_E=kernels.BLOCK_E)


def main() -> int:
    failed = 0
    for kernel, types, constexprs in variants():
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
        indices = {(names.index(n),): value for n, value in constexprs.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=indices)
        dtype = types.get("feature", types.get("grad_out", ""))
        label = f"{kernel.fn.__name__} {dtype} {constexprs}"
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            print(f"compiled {label}: {len(compiled.asm['cubin'])} bytes")
        except Exception as error:  # reported; the exit code tells the test
            failed += 1
            print(f"FAILED {label}: {type(error).__name__}: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
