"""What an ahead-of-time compile says about the loss kernels, today's and the candidates, without a GPU.

Compiles the forward and backward of today (masked_mse.py) and the whole-row forward candidate
(row_loads.py) for sm_90 and sm_80 at the motivating shape (B = 65536, D = 187, K = 171, norm="stats",
reduction mean), float32 and bfloat16, disassembles the cubin with the bundled cuobjdump and prints one
JSON line per kernel, or with --markdown the table of tests/aot_report.md:

    python tests/sass_report.py --markdown > tests/aot_report.md      (TRITON_INTERPRET unset)
    python tests/sass_report.py --arch 90                             (one arch's records: the default tests)

Counts are static (instructions in the kernel's code, not executed): global loads by width (LDG.E.128 moves
16 bytes a thread, LDG.E 4, LDG.E.U16 2), "load instructions per 16 bytes" (1 for 128-bit loads, 4 for
scalar fp32, 8 for scalar bf16), 64-bit address arithmetic (IMAD.WIDE*, IADD3.X, LEA.HI.X: what int64
offsets cost), shared-memory and shuffle instructions (the in-SM gather), registers and spills (ptxas -v),
static shared memory, and the warps an SM can hold at those registers (of 64).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from fusedvq.kernels import tiles as settings
from fusedvq.kernels import masked_mse as mm
from fusedvq.kernels import row_loads as rl

B, D, K = 65536, 187, 171
ARCHS = (90, 80)
DTYPES = {"fp32": ("*fp32", 4), "bf16": ("*bf16", 2)}
I64, I32, F32 = "i64", "i32", "fp32"


def specs(dtype: str):
    """(name, fn, signature, constexprs, num_warps) of each kernel, as the launchers configure them."""
    t, size = DTYPES[dtype]
    block_b, block_k = settings.block_sizes(B, K, settings.TUNING.walk_tile)
    fwd_sig = {"x_ptr": t, "r_ptr": t, "emb_ptr": t, "idx_ptr": "*i64", "shift_ptr": "*fp32", "center_ptr": "*fp32",
               "scale_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": t, "partial_ptr": "*fp32",
               "column_partial_ptr": "*fp32", "colsum_partial_ptr": "*fp32", "colsum_ptr": "*fp32",
               "counter_ptr": "*i32", "B": I32, "K": I32, "D": I32, "stride_xb": I64, "stride_xd": I64,
               "stride_rb": I64, "stride_rk": I64, "stride_eb": I64, "stride_ec": I64, "gap_at": I32, "gap_width": I32,
               "out_scale": F32}
    fwd = dict(NORM=1, NAN_TO_NUM=0, REDUCTION=1, WEIGHTED=0, COLSUMS=0, CLEAN=0, EMBED=0, BLOCK_B=block_b, BLOCK_K=block_k,
               BLOCK_P=settings.BLOCK_P)
    yield "forward (today: gather)", mm._masked_mse_fwd_kernel, fwd_sig, fwd, settings.num_warps_for(block_b, block_k)
    block_b, block_d = settings.block_sizes(B, D, settings.TUNING.backward_tile)
    bwd_sig = {"grad_ptr": t, "x_ptr": t, "r_ptr": t, "emb_ptr": t, "col_start_ptr": "*i32", "inv_k_ptr": "*i32",
               "shift_ptr": "*fp32", "center_ptr": "*fp32", "scale_ptr": "*fp32", "inv_n1_ptr": "*fp32",
               "inv_n_ptr": "*fp32", "sums_ptr": "*fp32", "w_ptr": "*fp32", "grad_x_ptr": t, "grad_r_ptr": t,
               "grad_e_ptr": t, "B": I32, "K": I32, "D": I32, "stride_xb": I64, "stride_xd": I64, "stride_rb": I64,
               "stride_rk": I64, "stride_eb": I64, "stride_ec": I64, "gap_at": I32, "gap_width": I32, "stride_gb": I64, "stride_gk": I64, "grad_scale": F32}
    bwd = dict(NORM=1, NAN_TO_NUM=0, REDUCTION=1, WEIGHTED=0, SUMS_FINAL=0, CLEAN=0, WRITE_X=1, WRITE_R=1, EMBED=0,
               WRITE_E=0, BLOCK_B=block_b, BLOCK_D=block_d)
    yield "backward (today)", mm._masked_mse_bwd_kernel, bwd_sig, bwd, settings.num_warps_for(block_b, block_d)
    rows = rl.chunk_rows(size)
    rows_sig = {"x_ptr": t, "r_ptr": t, "idx_ptr": "*i64", "shift_ptr": "*fp32", "scale_ptr": "*fp32",
                "w_ptr": "*fp32", "out_ptr": t, "partial_ptr": "*fp32", "column_partial_ptr": "*fp32",
                "counter_ptr": "*i32", "B": I32, "K": I32, "D": I32, "RW": I32, "gap_at": I32, "gap_width": I32,
                "out_scale": F32}
    block_k = settings.next_power_of_2(K)
    rows_c = dict(NORM=1, NAN_TO_NUM=0, REDUCTION=1, WEIGHTED=0, ROWS=rows, FLAT_X=settings.next_power_of_2(rows * D),
                  FLAT_R=settings.next_power_of_2(rows * K), BLOCK_K=block_k, BLOCK_P=settings.BLOCK_P, VEC=16 // size)
    warps = settings.num_warps_for(rows, block_k)
    yield f"forward (candidate: rows, {rows} a chunk)", rl._rows_fwd_kernel, rows_sig, rows_c, warps


_ADDR64 = re.compile(r"^(IMAD\.WIDE|IADD3\.X|LEA\.HI\.X|IADD\.64|IMAD\.X)")


def sass_counts(sass: str) -> dict:
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    loads = [op for op in ops if op.startswith("LDG")]
    width = {op: (16 if ".128" in op else 8 if ".64" in op else 2 if ".U16" in op or ".S16" in op else
                  1 if ".U8" in op or ".S8" in op else 4) for op in set(loads)}
    moved = sum(width[op] for op in loads)
    return {
        "instructions": len(ops),
        "LDG.128": sum(".128" in op for op in loads),
        "LDG.64": sum(".64" in op for op in loads),
        "LDG.32": sum(width[op] == 4 for op in loads),
        "LDG.16": sum(width[op] == 2 for op in loads),
        "loads per 16 B": round(len(loads) / (moved / 16), 2) if moved else None,
        "STG": sum(op.startswith("STG") for op in ops),
        "64-bit address ops": sum(bool(_ADDR64.match(op)) for op in ops),
        "shared / shuffle ops": sum(op.startswith(("LDS", "STS", "SHFL")) for op in ops),
    }


# The integer arguments' values at the motivating shape (contiguous x [B, D] and r [B, K], no gap): Triton
# specializes a launch on them as below, and so does this compile.
VALUES = {"B": B, "K": K, "D": D, "RW": K, "stride_xb": D, "stride_xd": 1, "stride_rb": K, "stride_rk": 1,
          "stride_eb": D, "stride_ec": 1, "gap_at": K, "gap": 0, "stride_gb": 0, "stride_gk": 0}


def specialize(signature: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as a launch with 16-byte-aligned tensors specializes them: every
    pointer divisible by 16 bytes, an integer equal to 1 a constant, one divisible by 16 said so. (Without
    this the compiler assumes 4-byte alignment and no load can be 128-bit.)"""
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for i, (name, kind) in enumerate(signature.items()):
        value = VALUES.get(name)
        if kind.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            constexprs[name] = 1
        elif value is not None and value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    return signature, constexprs, attrs


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> dict:
    signature, constexprs, attrs = specialize(signature, constexprs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": True})
    tools = Path(get_ptxas(arch).path).parent
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx),
                              "-o", str(cubin)], capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    text = log.stdout + log.stderr
    regs = max((int(n) for n in re.findall(r"Used (\d+) registers", text)), default=-1)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    shared = int(getattr(compiled.metadata, "shared", 0))
    # Warps an SM holds: 64K registers (allocated per warp in units of 256), 64 warps, 228 KiB shared.
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(65536 // (per_warp * num_warps), 64 // num_warps, (233472 // shared) if shared else 64)
    return {"registers": regs, "spill_bytes": spills, "shared_bytes": shared, "num_warps": num_warps,
            "warps_per_sm": blocks * num_warps, **sass_counts(sass)}


def _record(job: tuple) -> dict:
    arch, dtype, index = job
    name, fn, sig, consts, warps = list(specs(dtype))[index]
    return {"kernel": name, "arch": arch, "dtype": dtype, **compile_kernel(fn, sig, consts, warps, arch)}


def records(archs=ARCHS) -> list[dict]:
    """One record per kernel, dtype and arch (in that order of nesting, arch outermost), compiled in
    parallel processes."""
    jobs = [(arch, dtype, i) for arch in archs for dtype in DTYPES for i in range(len(list(specs(dtype))))]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_record, jobs))


COLUMNS = ("registers", "spill_bytes", "shared_bytes", "warps_per_sm", "instructions", "LDG.128", "LDG.64", "LDG.32",
           "LDG.16", "loads per 16 B", "STG", "64-bit address ops", "shared / shuffle ops")


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Ahead-of-time compile report: today's loss kernels and the candidates",
        "",
        f"Generated by `python tests/sass_report.py --markdown > tests/aot_report.md` (triton {triton.__version__}; "
        f"no GPU: ptxas and cuobjdump as bundled with triton). B = {B}, D = {D}, K = {K}, norm=\"stats\", "
        "reduction mean; static counts over each kernel's code (tests/sass_report.py says what each column "
        "counts); tests/test_aot.py checks the candidates' 128-bit loads and this file's kernels.",
        "",
        "| kernel | sm | dtype | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | " + " | ".join(str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    archs = tuple(int(a) for a in sys.argv[sys.argv.index("--arch") + 1].split(",")) if "--arch" in sys.argv else ARCHS
    rows = records(archs)
    if "--markdown" in sys.argv:
        sys.stdout.write(markdown(rows))
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
