"""Compile the fused kernels for an sm_90 GPU without one (run as a script, interpreter off).

Triton's full pipeline (frontend, TTIR, TTGIR, LLVM, PTX, ptxas) runs for a fixed target,
so a kernel that only works in the interpreter fails here. Prints one JSON line per kernel.
"""
import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset: the interpreter replaces the compiler")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from harmonizer_fast.ops import alignment_loss as A  # noqa: E402
from harmonizer_fast.ops import pyramid as P  # noqa: E402
from harmonizer_fast.ops import saliency_cut as S  # noqa: E402

F32, BF16 = "*fp32", "*bf16"
STRIDES = {name: "i64" for name in ("s_n", "s_c", "s_h", "s_w", "s_b", "sa_n", "sa_h", "sa_w", "sb_n", "sb_h", "sb_w")}
TAPS = dict(zip(("K0", "K1", "K2"), P.TAPS))

#: (label, kernel, pointer/float argument types (others: i32), compile-time constants)
CASES = [
    ("moments bf16", S._partial_moments_kernel, {"x_ptr": BF16}, {"BLOCK": 1024, "STORE_MEAN": True}),
    ("moments no store", S._partial_moments_kernel, {}, {"BLOCK": 1024, "STORE_MEAN": False}),
    ("standardize cut", S._standardize_cut_kernel, {}, {"BLOCK": 1024, "P_BLOCK": 64}),
    ("cut backward partial, scaled", S._cut_backward_partial_kernel, {}, {"BLOCK": 1024, "HAS_SCALE": True}),
    ("cut backward bf16", S._cut_backward_kernel, {"dx_ptr": BF16}, {"BLOCK": 1024, "P_BLOCK": 64, "HAS_SCALE": False}),
    ("downsample + squares", P._downsample_kernel, {}, {**TAPS, "BLOCK": 1024, "WITH_SQ": True}),
    ("downsample bf16", P._downsample_kernel, {"x_ptr": BF16}, {**TAPS, "BLOCK": 1024, "WITH_SQ": False}),
    ("adjoint + weighted addend", P._downsample_adjoint_kernel, {}, {**TAPS, "BLOCK": 1024, "HAS_ADD": True, "HAS_WEIGHT": True}),
    ("adjoint", P._downsample_adjoint_kernel, {}, {**TAPS, "BLOCK": 1024, "HAS_ADD": False, "HAS_WEIGHT": False}),
    ("difference, cut human", A._difference_kernel, {"a_ptr": BF16}, {"BLOCK": 1024, "P_BLOCK": 64, "CUT_A": False, "CUT_B": True}),
    ("difference, cut both", A._difference_kernel, {}, {"BLOCK": 1024, "P_BLOCK": 64, "CUT_A": True, "CUT_B": True}),
    ("difference", A._difference_kernel, {}, {"BLOCK": 1024, "P_BLOCK": 2, "CUT_A": False, "CUT_B": False}),
]


def signature(kernel, types, constants):
    out = {}
    for name in kernel.arg_names:
        if name in constants:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        elif name in STRIDES:
            out[name] = STRIDES[name]
        elif name.endswith("_ptr"):
            out[name] = F32
        elif name in ("eps", "max_eps", "coef"):
            out[name] = "fp32"
        else:
            out[name] = "i32"
    return out


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for label, kernel, types, constants in CASES:
        source = ASTSource(kernel, signature(kernel, types, constants),
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        try:
            compiled = triton.compile(source, target=target, options={"num_warps": 4})
            result = {"kernel": label, "ok": True, "ptx_chars": len(compiled.asm["ptx"])}
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            result = {"kernel": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        print(json.dumps(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
