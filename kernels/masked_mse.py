"""Fused masked MSE and clean_features, norm "none" / "stats": one launch forward, one launch backward, any
B (launchers.py launches them; batch_norm.py adds norm="batch" around them).

Math (reference.py states the same in torch ops), with x̃ = nan_to_num(x) when NAN_TO_NUM:
    forward   z[b, k] = (x̃[b, idx[k]] − μ[k]) · (1/σ[k])          (norm "none": z = x̃[b, idx[k]])
              diff = z − r,  e = w[k]·diff² (w = 1 unless WEIGHTED),
              loss = Σe/(B·K) | Σe | e | Σ_b e/B                  (reduction mean | sum | none | column [K])
    VJP       g = grad_out/(B·K) | grad_out | grad_out[b, k] | grad_out[k]/B,  dz = 2·g·w·diff
              ∂L/∂r[b, k] = −dz[b, k]
              ∂L/∂x[b, d] = Σ_{k : idx[k] = d} dz[b, k] · (1/σ[k])   (0 where x was non-finite)
    EMBED     (a hybrid's objective) r [B, K + gap_width] is compared on all its columns, those from gap_at on
              with emb [B, gap_width] as given (diff = emb − r, ∂L/∂emb = −∂L/∂r there): W = K + gap_width
    CLEAN     (clean_features) the forward writes z itself; the backward takes dz = ∂L/∂z as given:
              ∂L/∂x[b, d] = Σ_{k : idx[k] = d} dz[b, k] · (1/σ[k])   (0 where x was non-finite), no r
    norm "batch" reuses both kernels with NORM_BATCH: z = ((x̃ − c) − m)·(1/σ') and batch norm's VJP
    (batch_norm.py states it).
Plan:

forward   grid (cdiv(B, BLOCK_B),): each program owns BLOCK_B rows and walks the K kept columns in
          BLOCK_K chunks, gathering x through idx, so only the kept columns of x are ever read. For
          mean/sum it writes one fp32 partial sum (column: one per kept column, Σ diff² over its rows); the
          last program to finish (an int32 ticket counter, not a float atomic) adds the partials in program
          order and writes the scalar (or the K column errors): deterministic, one launch, no host sync.
backward  grid (cdiv(B, BLOCK_B), cdiv(D, BLOCK_D)): a gather over the D output columns through the
          inverse map (inv_ptr, inv_k): column d sums the gradients of the kept columns that read it
          (duplicates accumulate without atomics), every grad_x element is written exactly once (zeros
          in dropped columns, without reading x there), and each grad_r element is written by the one
          program that owns its column.
Both accumulate in fp32 and cast once on store; strides are arguments; row offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (FLT_MAX, NORM_NONE_C, NORM_STATS_C, REDUCTION_COLUMN_C, REDUCTION_NONE_C, add_terms, column_affine,
                    kept_columns, load_features, normalize, store_partial_pair, sum_partial_pairs, write_reduction)


# ---------------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _masked_mse_fwd_kernel(
    x_ptr,  # [B, D] features, any strides, fp32/fp16/bf16
    r_ptr,  # [B, K] target, any strides, dtype of x
    emb_ptr,  # [B, gap_width] embeddings, any strides, dtype of x (EMBED)
    idx_ptr,  # [K] int64: feature column read by kept column k
    shift_ptr,  # [K] fp32: μ (NORM 1), or the batch moments' shift c (NORM 2)
    center_ptr,  # [K] fp32: m, the batch mean around c (NORM 2): z = ((x − c) − m)·(1/σ')
    scale_ptr,  # [K] fp32: 1/σ (NORM >= 1)
    w_ptr,  # [W] fp32: the loss's weights (WEIGHTED); W = K + gap_width with EMBED, else K
    out_ptr,  # REDUCTION 0: [B, W] contiguous; 3: [W]; else []: dtype of x
    partial_ptr,  # [num_programs] fp32 workspace (mean/sum)
    column_partial_ptr,  # [num_programs, W] fp32 workspace (column): each program's Σ diff² per column
    colsum_partial_ptr,  # [num_programs, 2, K] fp32 workspace (COLSUMS)
    colsum_ptr,  # [2, K] fp32 out: (Σ_b diff·m, Σ_b diff·m·z), m = finite-z mask (COLSUMS)
    counter_ptr,  # [1] int32 ticket counter, 0 before and after every launch (mean/sum)
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    stride_eb,
    stride_ec,
    gap_at,  # r's columns gap_at .. gap_at + gap_width − 1 hold a hybrid decoder's embeddings, skipped unless EMBED:
    gap_width,  # kept column k is r's column k + (gap_width if k >= gap_at else 0); gap_width = 0: r is [B, K]
    out_scale,  # 1/(B·W) for mean, 1/B for column, 1 for sum
    NORM: tl.constexpr,  # 0 none, 1 stats, 2 batch (stats from the batch; z passes through nan_to_num)
    NAN_TO_NUM: tl.constexpr,  # 0/1
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum, 3 column
    WEIGHTED: tl.constexpr,  # 0/1: e = w[k]·diff²
    COLSUMS: tl.constexpr,  # 0/1: also the column sums the batch-norm backward needs (NORM 2, mean/sum)
    CLEAN: tl.constexpr,  # 0/1: clean_features, out = z itself (REDUCTION 0; r is not read)
    EMBED: tl.constexpr,  # 0/1: a hybrid's objective: r's gap columns compared with emb, outputs in r's order
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # chunk of partials the last program adds at a time
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    row_blocks = tl.cdiv(B, BLOCK_B)
    W = K + gap_width if EMBED else K  # the loss's columns
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols, d, col_ok = kept_columns(idx_ptr, k0, K, D, BLOCK_K)  # [BLOCK_K] each
        mu, center, inv_sigma = column_affine(shift_ptr, center_ptr, scale_ptr, cols, col_ok, NORM)
        rcols = (cols + tl.where(cols >= gap_at, gap_width, 0)).to(tl.int64)  # r's columns
        ocols = rcols if EMBED else cols.to(tl.int64)  # the outputs' and weights' columns
        wk = tl.zeros([BLOCK_K], dtype=tl.float32)
        if WEIGHTED:
            wk = tl.load(w_ptr + ocols, mask=col_ok, other=0.0)
        squares = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)  # (column)
        if COLSUMS:
            sum_m = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            sum_mz = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        # Persistent: this program owns row blocks pid, pid + P, ... (a fixed order: deterministic sums).
        for rb in range(pid, row_blocks, num_programs):
            rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B  # [BLOCK_B] int64 (rb·BLOCK_B < B + BLOCK_B fits int32)
            ok = (rows < B)[:, None] & col_ok[None, :]
            xv = load_features(x_ptr, rows, d, ok, stride_xb, stride_xd, NAN_TO_NUM)
            z, z_ok = normalize(xv, mu, center, inv_sigma, NORM)
            if CLEAN:
                tl.store(out_ptr + rows[:, None] * K + cols[None, :], z.to(out_ptr.dtype.element_ty), mask=ok)
            else:
                rv = tl.load(r_ptr + rows[:, None] * stride_rb + rcols[None, :] * stride_rk, mask=ok, other=0.0)
                diff = tl.where(ok, z - rv.to(tl.float32), 0.0)
                acc, squares = add_terms(diff, wk, acc, squares, out_ptr, rows, ocols, ok, W, REDUCTION, WEIGHTED)
                if COLSUMS:
                    m = tl.where(z_ok, diff, 0.0)
                    sum_m += m
                    sum_mz += m * z
        if REDUCTION == REDUCTION_COLUMN_C:
            tl.store(column_partial_ptr + pid.to(tl.int64) * W + ocols, tl.sum(squares, axis=0), mask=col_ok)
        if COLSUMS:
            store_partial_pair(colsum_partial_ptr, pid, cols, col_ok, K, sum_m, sum_mz)
    if EMBED:  # the gap's columns against the embeddings, as given: diff = emb − r (no norm, no statistics)
        for j0 in range(0, gap_width, BLOCK_K):
            jcols = j0 + tl.arange(0, BLOCK_K)
            j_ok = jcols < gap_width
            ecols = (gap_at + jcols).to(tl.int64)  # r's (and the outputs') columns
            we = tl.zeros([BLOCK_K], dtype=tl.float32)
            if WEIGHTED:
                we = tl.load(w_ptr + ecols, mask=j_ok, other=0.0)
            esq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
            for rb in range(pid, row_blocks, num_programs):
                rows = tl.arange(0, BLOCK_B).to(tl.int64) + rb * BLOCK_B
                ok = (rows < B)[:, None] & j_ok[None, :]
                ev = tl.load(emb_ptr + rows[:, None] * stride_eb + jcols.to(tl.int64)[None, :] * stride_ec, mask=ok,
                             other=0.0)
                rv = tl.load(r_ptr + rows[:, None] * stride_rb + ecols[None, :] * stride_rk, mask=ok, other=0.0)
                diff = tl.where(ok, ev.to(tl.float32) - rv.to(tl.float32), 0.0)
                acc, esq = add_terms(diff, we, acc, esq, out_ptr, rows, ecols, ok, W, REDUCTION, WEIGHTED)
            if REDUCTION == REDUCTION_COLUMN_C:
                tl.store(column_partial_ptr + pid.to(tl.int64) * W + ecols, tl.sum(esq, axis=0), mask=j_ok)
    if REDUCTION != REDUCTION_NONE_C:
        if REDUCTION != REDUCTION_COLUMN_C:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
        # Every thread's stores are issued before the ticket; acq_rel publishes them to the last program.
        tl.debug_barrier()
        ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if ticket == num_programs - 1:
            write_reduction(partial_ptr, column_partial_ptr, w_ptr, out_ptr, num_programs, W, out_scale, REDUCTION,
                            WEIGHTED, BLOCK_K, BLOCK_P)
            if COLSUMS:
                sum_partial_pairs(colsum_partial_ptr, colsum_ptr, num_programs, K, BLOCK_K)
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (and for CUDA-graph replays)


@triton.jit
def _masked_mse_bwd_kernel(
    grad_ptr,  # ∂L/∂loss: [] (mean/sum), [W] (column, stride stride_gk) or [B, W] any strides (none); CLEAN:
    # ∂L/∂z [B, K] any strides. W = K + gap_width with EMBED (r's column order), else K
    x_ptr,  # [B, D] features, any strides
    r_ptr,  # [B, K] target, any strides (not read with CLEAN)
    emb_ptr,  # [B, gap_width] embeddings, any strides (EMBED)
    col_start_ptr,  # [D+1] int32 inv_ptr (CSR): kept columns reading column d are inv_k[inv_ptr[d] : inv_ptr[d+1]]
    inv_k_ptr,  # [K] int32
    shift_ptr,  # [K] fp32: μ (NORM 1), or the batch moments' shift c (NORM 2)
    center_ptr,  # [K] fp32: m, the batch mean around c (NORM 2)
    scale_ptr,  # [K] fp32: 1/σ, or 1/σ' (NORM >= 1)
    inv_n1_ptr,  # [K] fp32: 1/(N − 1), or 0 where σ' = 1 (NORM 2; reference.py states the batch math)
    inv_n_ptr,  # [K] fp32: 1/N (NORM 2)
    sums_ptr,  # NORM 2: [2, K] fp32 column sums: (A1, A2) of the forward, or (S1, S2) when SUMS_FINAL
    w_ptr,  # [W] fp32: the loss's weights (WEIGHTED)
    grad_x_ptr,  # [B, D] contiguous, dtype of x: written everywhere, zeros included
    grad_r_ptr,  # [B, K + gap_width] contiguous, dtype of r, zero in the gap's columns already unless EMBED (not
    # written with CLEAN)
    grad_e_ptr,  # [B, gap_width] contiguous, dtype of emb (EMBED and WRITE_E)
    B,
    K,
    D,
    stride_xb,
    stride_xd,
    stride_rb,
    stride_rk,
    stride_eb,
    stride_ec,
    gap_at,  # as in the forward: kept column k is r's column k + (gap_width if k >= gap_at else 0)
    gap_width,
    stride_gb,
    stride_gk,
    grad_scale,  # 2/(B·W) for mean, 2/B for column, 2 otherwise: ∂e/∂z = 2·diff folded in (CLEAN: 1)
    NORM: tl.constexpr,  # 0 none, 1 stats, 2 batch
    NAN_TO_NUM: tl.constexpr,
    REDUCTION: tl.constexpr,
    WEIGHTED: tl.constexpr,  # 0/1: e = w[k]·diff², so dz carries w[k]
    SUMS_FINAL: tl.constexpr,  # NORM 2: sums are S1, S2 already (else A1, A2, scaled here by g)
    CLEAN: tl.constexpr,  # 0/1: clean_features, dz = ∂L/∂z given (REDUCTION 0, SUMS_FINAL with NORM 2)
    WRITE_X: tl.constexpr,  # 0/1: grad_x wanted (features require grad)
    WRITE_R: tl.constexpr,  # 0/1: grad_r wanted (the target requires grad; never with CLEAN)
    EMBED: tl.constexpr,  # 0/1: a hybrid's objective (the forward's); the grid's programs past cdiv(D, BLOCK_D)
    # on axis 1 own the gap's columns: ∂L/∂emb = 2·g·w·(emb − r) = −∂L/∂r there
    WRITE_E: tl.constexpr,  # 0/1: grad_e wanted (EMBED)
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BLOCK_B]
    row_ok = rows < B
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] feature columns
    d_ok = dcols < D
    # Built by build_column_map, so 0 <= start <= start + count <= K; clamped anyway, so that a corrupted map
    # (e.g. uninitialized buffers after module.to_empty) cannot make the kernel read outside inv_k.
    start = tl.minimum(tl.maximum(tl.load(col_start_ptr + dcols, mask=d_ok, other=0), 0), K)
    stop = tl.minimum(tl.maximum(tl.load(col_start_ptr + dcols + 1, mask=d_ok, other=0), start), K)
    count = stop - start  # kept columns reading d
    # x is read only where some kept column reads it.
    x_ok = row_ok[:, None] & (count > 0)[None, :]
    xv = tl.load(x_ptr + rows[:, None] * stride_xb + dcols.to(tl.int64)[None, :] * stride_xd, mask=x_ok, other=0.0)
    xv = xv.to(tl.float32)
    if NAN_TO_NUM:
        finite = tl.abs(xv) <= FLT_MAX
        xv = tl.where(finite, xv, 0.0)
    if REDUCTION != REDUCTION_NONE_C and REDUCTION != REDUCTION_COLUMN_C:
        g = tl.load(grad_ptr).to(tl.float32) * grad_scale
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.max(count, axis=0)):  # 1 pass without duplicates
        has = j < count
        k = tl.load(inv_k_ptr + start + j, mask=has, other=0).to(tl.int64)  # [BLOCK_D]
        has = has & (k >= 0) & (k < K)
        ok = row_ok[:, None] & has[None, :]
        mu, center, inv_sigma = column_affine(shift_ptr, center_ptr, scale_ptr, k, has, NORM)
        z, z_ok = normalize(xv, mu, center, inv_sigma, NORM)
        rk = k + tl.where(k >= gap_at, gap_width, 0)  # r's column
        ok_col = rk if EMBED else k  # the loss's column: of grad_output and the weights
        # The gradient factor of each kept column (all but reduction "none": one per column, gcol).
        if REDUCTION == REDUCTION_COLUMN_C:
            gcol = tl.load(grad_ptr + ok_col * stride_gk, mask=has, other=0.0).to(tl.float32) * grad_scale
        elif REDUCTION != REDUCTION_NONE_C:
            gcol = tl.zeros([BLOCK_D], dtype=tl.float32) + g
        if WEIGHTED:
            wk = tl.load(w_ptr + ok_col, mask=has, other=0.0)
        if REDUCTION == REDUCTION_NONE_C:
            gk = tl.load(grad_ptr + rows[:, None] * stride_gb + ok_col[None, :] * stride_gk, mask=ok, other=0.0)
            gk = gk.to(tl.float32) * grad_scale
            if WEIGHTED:
                gk = gk * wk[None, :]
        else:
            if WEIGHTED:
                gcol = gcol * wk
            gk = gcol[None, :]
        if CLEAN:
            dzv = gk  # ∂L/∂z
        else:
            rv = tl.load(r_ptr + rows[:, None] * stride_rb + rk[None, :] * stride_rk, mask=ok, other=0.0)
            diff = z - rv.to(tl.float32)
            dzv = diff * gk
            if WRITE_R:
                grad_r_offs = rows[:, None] * (K + gap_width) + rk[None, :]
                tl.store(grad_r_ptr + grad_r_offs, (-dzv).to(grad_r_ptr.dtype.element_ty), mask=ok)
        if NORM == NORM_NONE_C:
            dx = dzv
        elif NORM == NORM_STATS_C:
            dx = dzv * inv_sigma[None, :]
        else:
            # Batch norm's backward: (1/σ')·(dz − S1/N − z·S2/(N − 1)), with S1 = Σ dz, S2 = Σ dz·z over the batch.
            dz = tl.where(z_ok, dzv, 0.0)
            inv_n1 = tl.load(inv_n1_ptr + k, mask=has, other=0.0)
            inv_n = tl.load(inv_n_ptr + k, mask=has, other=0.0)
            s1 = tl.load(sums_ptr + k, mask=has, other=0.0)
            s2 = tl.load(sums_ptr + K + k, mask=has, other=0.0)
            if not SUMS_FINAL:
                s1 = s1 * gcol
                s2 = s2 * gcol
            dx = (dz - (s1 * inv_n)[None, :] - z * (s2 * inv_n1)[None, :]) * inv_sigma[None, :]
        acc += tl.where(ok, dx, 0.0)
    if NAN_TO_NUM:
        acc = tl.where(finite, acc, 0.0)
    if WRITE_X:
        out_ok = row_ok[:, None] & d_ok[None, :]
        tl.store(grad_x_ptr + rows[:, None] * D + dcols[None, :], acc.to(grad_x_ptr.dtype.element_ty), mask=out_ok)
    if EMBED:  # the gap's columns (programs past the D columns'; masked off in the others)
        jcols = (pid_d - tl.cdiv(D, BLOCK_D)) * BLOCK_D + tl.arange(0, BLOCK_D)
        j_ok = (jcols >= 0) & (jcols < gap_width)
        jcols = tl.where(j_ok, jcols, 0).to(tl.int64)
        ecols = gap_at + jcols  # r's columns, and the loss's
        ok = row_ok[:, None] & j_ok[None, :]
        ev = tl.load(emb_ptr + rows[:, None] * stride_eb + jcols[None, :] * stride_ec, mask=ok, other=0.0)
        rv = tl.load(r_ptr + rows[:, None] * stride_rb + ecols[None, :] * stride_rk, mask=ok, other=0.0)
        if REDUCTION == REDUCTION_NONE_C:
            ge = tl.load(grad_ptr + rows[:, None] * stride_gb + ecols[None, :] * stride_gk, mask=ok, other=0.0)
            ge = ge.to(tl.float32) * grad_scale
        elif REDUCTION == REDUCTION_COLUMN_C:
            ge = (tl.load(grad_ptr + ecols * stride_gk, mask=j_ok, other=0.0).to(tl.float32) * grad_scale)[None, :]
        else:
            ge = tl.zeros([1, BLOCK_D], dtype=tl.float32) + g
        if WEIGHTED:
            ge = ge * tl.load(w_ptr + ecols, mask=j_ok, other=0.0)[None, :]
        dze = (ev.to(tl.float32) - rv.to(tl.float32)) * ge
        if WRITE_R:
            tl.store(grad_r_ptr + rows[:, None] * (K + gap_width) + ecols[None, :],
                     (-dze).to(grad_r_ptr.dtype.element_ty), mask=ok)
        if WRITE_E:
            tl.store(grad_e_ptr + rows[:, None] * gap_width + jcols[None, :], dze.to(grad_e_ptr.dtype.element_ty), ok)
