"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, no GPU needed.

Run as a script (with TRITON_INTERPRET unset: the interpreter replaces @triton.jit): compiles the kernels in
the configurations the launchers can produce, runs the bundled ptxas -v on the PTX, and prints one JSON line
per compile with the registers and spill bytes, or the error. tests/test_aot.py drives it.

By default it compiles a covering set (`covering`): every value of each setting of a kernel (the arch, the
dtype, the block shape, each flag) that any configuration holds, in about 30 compiles instead of all 600 or so
(a compile takes half a second of a core). `--pairs` covers every pair of two settings' values too (about 100
compiles); `--all` compiles every configuration on both archs (the sweep: tests/test_aot.py's, with --sweeps).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from fusedvq.kernels import batch_norm as bs
from fusedvq.kernels import masked_mse as mm
from fusedvq.kernels import partials as pt
from fusedvq.kernels import tiles as settings
from fusedvq.kernels import row_loads as rl

ARCHS = (80, 90)
FLOAT_TYPES = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


SHAPES = [(4, 187, 171), (65536, 187, 171), (4099, 1024, 1000), (3, 8, 8)]  # (B, D, K)
I64, I32, F32 = "i64", "i32", "fp32"


def flag_grid():
    """(dtype, NORM, NAN_TO_NUM, REDUCTION, WEIGHTED, shapes): every flag combination in fp32 at the
    motivating shape, and every dtype at every block configuration with all features on (the most
    registers)."""
    yield "*fp32", 1, 0, 1, 0, SHAPES[1:2]
    for norm, red, weighted in itertools.product((0, 1, 2), (0, 1, 2, 3), (0, 1)):
        yield "*fp32", norm, 1, red, weighted, SHAPES[1:2]
    for dtype in FLOAT_TYPES.values():
        for norm, red in ((1, 0), (1, 1), (1, 3), (2, 0), (2, 1), (2, 3)):
            yield dtype, norm, 1, red, 1, SHAPES


def _blocks(shapes, pick, tile):
    return sorted({settings.block_sizes(B, pick(D, K), tile) for B, D, K in shapes})


def kernel_specs():
    """(name, fn, signature, constexprs) for the configurations the launchers produce."""
    for dtype, norm, n2n, red, weighted, shapes in flag_grid():
        for block_b, block_k in _blocks(shapes, lambda D, K: K, settings.TUNING.walk_tile):
            sig = {
                "x_ptr": dtype, "r_ptr": dtype, "emb_ptr": dtype, "idx_ptr": "*i64", "shift_ptr": "*fp32",
                "center_ptr": "*fp32", "scale_ptr": "*fp32",
                "w_ptr": "*fp32", "out_ptr": dtype, "partial_ptr": "*fp32", "column_partial_ptr": "*fp32",
                "colsum_partial_ptr": "*fp32", "colsum_ptr": "*fp32",
                "counter_ptr": "*i32", "B": I32, "K": I32, "D": I32,
                "stride_xb": I64, "stride_xd": I64, "stride_rb": I64, "stride_rk": I64, "stride_eb": I64,
                "stride_ec": I64, "gap_at": I32, "gap_width": I32, "out_scale": F32,
            }
            # clean_features (reduction "none" only; fewer live values than the loss): at the motivating shape
            # a hybrid's objective (EMBED: the embedding columns too): weighted, at the motivating shape
            hybrid = weighted and shapes == SHAPES[1:2]
            for clean, embed in ((0, 0), *([(1, 0)] if red == 0 and shapes == SHAPES[1:2] else []),
                                 *([(0, 1)] if hybrid else [])):
                consts = dict(NORM=norm, NAN_TO_NUM=n2n, REDUCTION=red, WEIGHTED=weighted, COLSUMS=int(norm == 2 and red != 0),
                              CLEAN=clean, EMBED=embed, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_P=settings.BLOCK_P)
                yield "fwd", mm._masked_mse_fwd_kernel, sig, consts
        for block_b, block_d in _blocks(shapes, lambda D, K: D, settings.TUNING.backward_tile):
            sig = {
                "grad_ptr": dtype, "x_ptr": dtype, "r_ptr": dtype, "emb_ptr": dtype, "col_start_ptr": "*i32",
                "inv_k_ptr": "*i32", "shift_ptr": "*fp32", "center_ptr": "*fp32", "scale_ptr": "*fp32", "inv_n1_ptr": "*fp32",
                "inv_n_ptr": "*fp32", "sums_ptr": "*fp32", "w_ptr": "*fp32", "grad_x_ptr": dtype,
                "grad_r_ptr": dtype, "grad_e_ptr": dtype, "B": I32, "K": I32, "D": I32,
                "stride_xb": I64, "stride_xd": I64, "stride_rb": I64, "stride_rk": I64, "stride_eb": I64,
                "stride_ec": I64, "gap_at": I32, "gap_width": I32,
                "stride_gb": I64, "stride_gk": I64, "grad_scale": F32,
            }
            # Batch norm with reduction "none" always gets final sums (S1, S2) from _dz_sums_kernel.
            for sums_final in ((1,) if red == 0 else (0, 1)) if norm == 2 else (0,):
                for clean in (0, 1) if red == 0 and shapes == SHAPES[1:2] else (0,):
                    writes = ((1, 1), (1, 0), (0, 1)) if not clean and shapes == SHAPES[1:2] else ((1, 1 - clean),)
                    hybrid = ((1, 1, 1),) if not clean and weighted and shapes == SHAPES[1:2] else ()
                    for write_x, write_r, embed in (*((*w, 0) for w in writes), *hybrid):  # (EMBED: hybrid)
                        consts = dict(NORM=norm, NAN_TO_NUM=n2n, REDUCTION=red, WEIGHTED=weighted * (1 - clean),
                                      SUMS_FINAL=sums_final, CLEAN=clean, WRITE_X=write_x, WRITE_R=write_r,
                                      EMBED=embed, WRITE_E=embed, BLOCK_B=block_b, BLOCK_D=block_d)
                        yield "bwd", mm._masked_mse_bwd_kernel, sig, consts
        if norm != 2 and shapes == SHAPES[1:2] and not (weighted and red == 2):
            for size, vec in (("*fp32", 4), ("*bf16", 8), ("*fp16", 8)):
                if size != dtype:
                    continue
                rows = rl.chunk_rows(16 // vec)
                sig = {"x_ptr": dtype, "r_ptr": dtype, "idx_ptr": "*i64", "shift_ptr": "*fp32", "scale_ptr": "*fp32",
                       "w_ptr": "*fp32", "out_ptr": dtype, "partial_ptr": "*fp32", "column_partial_ptr": "*fp32",
                       "counter_ptr": "*i32", "B": I32, "K": I32, "D": I32, "RW": I32, "gap_at": I32, "gap_width": I32,
                       "out_scale": F32}
                yield "rows_fwd", rl._rows_fwd_kernel, sig, dict(
                    NORM=norm, NAN_TO_NUM=n2n, REDUCTION=red, WEIGHTED=weighted, ROWS=rows,
                    FLAT_X=settings.next_power_of_2(rows * 187), FLAT_R=settings.next_power_of_2(rows * 171),
                    BLOCK_K=256, BLOCK_P=settings.BLOCK_P, VEC=vec)
        if norm != 2 or (weighted and red != 0):
            continue
        for block_b, block_k in _blocks(shapes, lambda D, K: K, settings.TUNING.walk_tile):
            blocks = dict(BLOCK_B=block_b, BLOCK_K=block_k)
            for finalize in (0, 1):
                sig = {"x_ptr": dtype, "idx_ptr": "*i64", "partial_ptr": "*fp32", "count_ptr": "*fp32",
                       "moments_ptr": "*fp32", "counter_ptr": "*i32", "B": I32, "K": I32, "D": I32,
                       "stride_xb": I64, "stride_xd": I64, "eps": F32}
                yield "moments", bs._column_moments_kernel, sig, dict(NAN_TO_NUM=n2n, FINALIZE=finalize, **blocks)
            if red == 0:
                sig = {"grad_ptr": dtype, "x_ptr": dtype, "r_ptr": dtype, "idx_ptr": "*i64", "shift_ptr": "*fp32",
                       "center_ptr": "*fp32", "scale_ptr": "*fp32", "w_ptr": "*fp32", "partial_ptr": "*fp32",
                       "sums_ptr": "*fp32", "counter_ptr": "*i32",
                       "B": I32, "K": I32, "D": I32, "stride_gb": I64, "stride_gk": I64, "stride_xb": I64,
                       "stride_xd": I64, "stride_rb": I64, "stride_rk": I64, "gap_at": I32, "gap_width": I32}
                for clean in (0, 1) if shapes == SHAPES[1:2] else (0,):
                    for embed in (0, 1) if shapes == SHAPES[1:2] and weighted and not clean else (0,):
                        yield "dz_sums", bs._dz_sums_kernel, sig, dict(NAN_TO_NUM=n2n, CLEAN=clean, EMBED=embed,
                                                                       WEIGHTED=weighted * (1 - clean), **blocks)
    yield from partials_specs()


def partials_specs():
    """The P partial kernels (kernels/partials.py): fp32 and bf16, both reductions, the block shapes of
    B = 4 and 65536 at W = 171 (bf16: the larger), with and without a hybrid's embeddings (EMBED); one
    gradient alone in fp32."""
    for dtype, red in itertools.product(("*fp32", "*bf16"), (1, 3)):
        sig = {"z_ptr": dtype, "r_ptr": dtype, "emb_ptr": dtype, "out_ptr": dtype, "workspace_ptr": "*fp32",
               "column_workspace_ptr": "*fp32", "counter_ptr": "*i32", "B": I32, "K": I32, "W": I32, "KO": I32,
               "stride_zb": I64, "stride_zk": I64, "stride_rp": I64, "stride_rb": I64, "stride_rw": I64,
               "stride_eb": I64, "stride_ec": I64, "gap_at": I32, "gap_width": I32, "out_scale": F32}
        for block_b, block_w in sorted({settings.block_sizes(B, 171, settings.TUNING.walk_tile)
                                         for B in ((4, 65536) if dtype == "*fp32" else (65536,))}):
            for embed in (0, 1):
                yield "partials_fwd", pt._partials_fwd_kernel, sig, dict(REDUCTION=red, EMBED=embed, BLOCK_B=block_b,
                                                                         BLOCK_W=block_w, BLOCK_P=settings.BLOCK_P)
        sig = {"grad_ptr": dtype, "z_ptr": dtype, "r_ptr": dtype, "emb_ptr": dtype, "grad_z_ptr": dtype,
               "grad_r_ptr": dtype, "grad_e_ptr": dtype, "P": I32, "B": I32, "K": I32, "W": I32, "stride_zb": I64,
               "stride_zk": I64, "stride_rp": I64, "stride_rb": I64, "stride_rw": I64, "stride_eb": I64,
               "stride_ec": I64, "stride_gp": I64, "stride_gk": I64, "gap_at": I32, "gap_width": I32, "grad_scale": F32}
        for block_b, block_w in sorted({settings.block_sizes(B, 171, settings.TUNING.backward_tile) for B in (4, 65536)}):
            for write_z, write_r in ((1, 1), (1, 0), (0, 1)) if dtype == "*fp32" and red == 1 else ((1, 1),):
                for embed, write_e in ((0, 0), (1, 1)) if (write_z, write_r) == (1, 1) else ((0, 0), (1, 0)):
                    yield "partials_bwd", pt._partials_bwd_kernel, sig, dict(
                        REDUCTION=red, EMBED=embed, WRITE_Z=write_z, WRITE_R=write_r, WRITE_E=write_e,
                        BLOCK_B=block_b, BLOCK_W=block_w)


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v's report on the PTX, with the flags Triton's own cubin step passes."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True)
    return out.stderr + out.stdout


def compile_one(fn, signature, constexprs, arch):
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32)
    rows = constexprs.get("ROWS", constexprs.get("BLOCK_B"))  # (ROWS: the whole-row candidate's)
    warps = settings.num_warps_for(rows, constexprs.get("BLOCK_K", constexprs.get("BLOCK_D", constexprs.get("BLOCK_W"))))
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # Triton prints its ptxas -v log here
        compiled = triton.compile(src, target=target, options={"num_warps": warps, "enable_fp_fusion": True})
    log = printed.getvalue() or _ptxas_log(compiled.asm["ptx"], arch)  # (a compile from Triton's cache ran none)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    regs = max((int(n) for n in re.findall(r"Used (\d+) registers", log)), default=-1)
    return regs, spills, warps


SHAPE = ("BLOCK_B", "BLOCK_K", "BLOCK_D", "BLOCK_W", "BLOCK_P", "ROWS", "FLAT_X", "FLAT_R", "VEC")


def settings_of(record: dict) -> tuple:
    """A compile's settings, (name, value) pairs: the arch, the dtype, the block shape (one setting: its
    sizes go together) and each flag. `record` is a printed record (or a job's first keys)."""
    shape = tuple(sorted((k, v) for k, v in record.items() if k in SHAPE))
    flags = sorted((k, v) for k, v in record.items() if k.isupper() and k not in SHAPE)
    return (("arch", record["arch"]), ("dtype", record["dtype"]), ("shape", shape), *flags)


def held_values(record: dict, pairs: bool = False) -> set:
    """What one compile covers: (kernel, setting) for each setting's value, and with pairs (kernel, setting,
    setting) for each pair of two."""
    held = settings_of(record)
    both = {(record["kernel"], *pair) for pair in itertools.combinations(held, 2)} if pairs else set()
    return both | {(record["kernel"], one) for one in held}


def every_job() -> list[dict]:
    """Each distinct configuration on each arch: {"kernel", "arch", "dtype", **constexprs, "spec": index}."""
    jobs, seen = [], set()
    for index, (name, _, sig, consts) in enumerate(kernel_specs()):
        for arch in ARCHS:
            job = {"kernel": name, "arch": arch, "dtype": next(iter(sig.values())), **consts}
            key = tuple(sorted(job.items()))
            if key not in seen:
                seen.add(key)
                jobs.append({**job, "spec": index})
    return jobs


def covering(jobs: list[dict], pairs: bool = False) -> list[dict]:
    """A few of `jobs` holding every setting's value (with pairs: and every pair of two settings' values),
    per kernel, that any of them holds: greedily, the job that holds the most not yet held, first in `jobs`
    on a tie (so the same set from run to run)."""
    held = [held_values(job, pairs) for job in jobs]
    needed, chosen = set().union(*held), []
    while needed:
        best = max(range(len(jobs)), key=lambda i: len(held[i] & needed))
        chosen.append(jobs[best])
        needed -= held[best]
    return chosen


@functools.lru_cache(maxsize=None)
def _specs() -> list:
    return list(kernel_specs())


def _compile_record(job: dict) -> dict:
    name, fn, sig, consts = _specs()[job["spec"]]
    record = {k: v for k, v in job.items() if k != "spec"}
    try:
        record["registers"], record["spill_bytes"], record["num_warps"] = compile_one(fn, sig, consts, job["arch"])
    except Exception as err:  # reported, and failed by the test
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
    return record


def main() -> int:
    jobs = every_job() if "--all" in sys.argv else covering(every_job(), pairs="--pairs" in sys.argv)
    knobs.nvidia.dump_ptxas_log = True  # Triton's cubin step runs ptxas -v: its report, without a second ptxas
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for record in pool.map(_compile_record, jobs, chunksize=2):
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
