"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, no GPU needed.

Run as a script (with TRITON_INTERPRET unset: the interpreter replaces @triton.jit): compiles each kernel
in each configuration the launchers can produce, runs the bundled ptxas -v on the PTX, and prints one JSON
line per compile with the registers and spill bytes, or the error. tests/test_aot.py drives it.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from fusedvq.kernels import masked_mse as mm

ARCHS = (80, 90)
FLOAT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _pointer_sig(names, dtype_ptr):
    return {n: dtype_ptr for n in names}


SHAPES = [(4, 187, 171), (65536, 187, 171), (4099, 1024, 1000), (3, 8, 8)]  # (B, D, K)


def flag_grid():
    """(dtype, NORM, NAN_TO_NUM, REDUCTION, shapes): every flag combination in fp32 at the motivating shape,
    and every dtype at every block configuration with all features on (the most registers)."""
    for norm, n2n, red in itertools.product((0, 1), (0, 1), (0, 1, 2)):
        yield "*fp32", norm, n2n, red, SHAPES[1:2]
    for dtype in FLOAT_TYPES.values():
        yield dtype, 1, 1, 0, SHAPES
        yield dtype, 1, 1, 1, SHAPES


def masked_mse_specs():
    """(name, fn, signature, constexprs) for the configurations the launchers produce."""
    for dtype, norm, n2n, red, shapes in flag_grid():
        blocks = {mm.block_sizes(B, K) for B, _, K in shapes}
        for block_b, block_k in sorted(blocks):
            sig = {
                "x_ptr": dtype, "r_ptr": dtype, "idx_ptr": "*i64", "shift_ptr": "*fp32", "scale_ptr": "*fp32",
                "out_ptr": dtype, "partial_ptr": "*fp32", "counter_ptr": "*i32",
                "B": "i32", "K": "i32", "D": "i32",
                "stride_xb": "i64", "stride_xd": "i64", "stride_rb": "i64", "stride_rk": "i64", "out_scale": "fp32",
            }
            consts = dict(NORM=norm, NAN_TO_NUM=n2n, REDUCTION=red, BLOCK_B=block_b, BLOCK_K=block_k,
                          BLOCK_P=mm._BLOCK_P)
            yield "fwd", mm._masked_mse_fwd_kernel, sig, consts
        blocks = {mm.block_sizes(B, D) for B, D, _ in shapes}
        for block_b, block_d in sorted(blocks):
            sig = {
                "grad_ptr": dtype, "x_ptr": dtype, "r_ptr": dtype, "inv_ptr_ptr": "*i32", "inv_k_ptr": "*i32",
                "shift_ptr": "*fp32", "scale_ptr": "*fp32", "grad_x_ptr": dtype, "grad_r_ptr": dtype,
                "B": "i32", "K": "i32", "D": "i32",
                "stride_xb": "i64", "stride_xd": "i64", "stride_rb": "i64", "stride_rk": "i64",
                "stride_gb": "i64", "stride_gk": "i64", "grad_scale": "fp32",
            }
            consts = dict(NORM=norm, NAN_TO_NUM=n2n, REDUCTION=red, BLOCK_B=block_b, BLOCK_D=block_d)
            yield "bwd", mm._masked_mse_bwd_kernel, sig, consts


def all_specs():
    yield from masked_mse_specs()
    try:
        from fusedvq.kernels import batch_stats
    except ImportError:
        return
    yield from batch_stats.aot_specs()


def compile_one(fn, signature, constexprs, arch):
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(src, target=target, options={"num_warps": 4, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", "/dev/null"],
            capture_output=True, text=True, check=True,
        )
    log = out.stderr + out.stdout
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    regs = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=-1)
    return regs, spills


def main() -> int:
    for (name, fn, sig, consts), arch in itertools.product(list(all_specs()), ARCHS):
        record = {"kernel": name, "arch": arch, "dtype": next(iter(sig.values())), **consts}
        try:
            record["registers"], record["spill_bytes"] = compile_one(fn, sig, consts, arch)
        except Exception as err:  # reported, and failed by the test
            record["error"] = f"{type(err).__name__}: {err}"[:2000]
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
