"""The host's side of a launch, with no triton import at the top (fusedvq's host code imports this module on
CPU-only installs too): what the host hands the kernels besides tensors — the mode codes (the kernels compare
their NORM and REDUCTION constexprs with them; the host's op schemas carry them as integers), the Mode
record of one launch, the column map every backend reads, the scale of a reduction, the current stream's
handle. (KernelLauncher, which launches a compiled kernel with as little host work as possible, is
launchers.py's; the launch shapes and the scratch memory of the last-program reductions are tiles.py's.)

The column map: which of the D feature columns each of the K kept columns reads, and the inverse.

    index    [K]   int64  index[k] = d, the feature column that kept column k reads (duplicates allowed)
    inv_ptr  [D+1] int32  CSR pointers over the D feature columns: the kept columns reading column d are
                          inv_k[inv_ptr[d] : inv_ptr[d+1]]
    inv_k    [K]   int32  the k's sorted by the column they read (stable: ascending k within a column)

The backward kernels write grad_x as a gather over the D output columns through (inv_ptr, inv_k), so
duplicate indices accumulate without atomics and every grad_x element is written exactly once. fusedvq
builds it (arguments.build_column_map) with device-side torch ops only (no host synchronization).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM, REDUCTION_COLUMN = 0, 1, 2, 3  # ([B, K], Σ/(B·K), Σ, Σ_b/B [K])
NORM_NONE, NORM_STATS, NORM_BATCH = 0, 1, 2  # (x̃, (x̃ − μ)/σ, the batch's own μ, σ)


class Gap(NamedTuple):
    """The target's gap: a hybrid decoder's `width` embedding columns, from column `at` on, that the feature
    columns' loss skips (the target is [B, K + width]; kept column k is its column k + width·[k >= at]). The
    public argument is target_gap=(at, width); the op schemas and kernels take gap_at and gap_width."""

    at: int = 0
    width: int = 0


NO_GAP = Gap(0, 0)


class Mode(NamedTuple):
    """What a launch computes: the norm and reduction codes, nan_to_num, the target's Gap (skipped unless a
    hybrid's embeddings are compared there), which gradients are wanted (grad_x, grad_target), and whether it
    is clean_features (z itself, no target)."""

    norm: int = NORM_NONE
    nan_to_num: bool = False
    reduction: int = REDUCTION_MEAN
    gap: Gap = NO_GAP
    needs: tuple = (True, True)
    clean: bool = False


class ColumnMap(NamedTuple):
    index: torch.Tensor  # [K] int64
    inv_ptr: torch.Tensor  # [D+1] int32
    inv_k: torch.Tensor  # [K] int32


# The accumulation dtype of every backend, by input dtype: float64 stays float64 (the PyTorch paths), the
# others compute in float32. (A lookup rather than a function: the hot path of a small batch counts calls.)
COMPUTE_DTYPE = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
                 torch.bfloat16: torch.float32}


def reduction_scale(reduction: int, B: int, K: int) -> float:
    """What the reduction multiplies the sum of its terms by: 1/(B·K) for mean, 1/B for column (a column's
    sum over the batch), 1 for sum and none; the gradient's factor is twice it. B = 0 (a rank without rows)
    counts as 1. Every launcher and the CPU path's reductions (fusedvq/cpu/blocked.py) read it."""
    if reduction == REDUCTION_MEAN:
        return 1.0 / max(B * K, 1)
    return 1.0 / max(B, 1) if reduction == REDUCTION_COLUMN else 1.0


def current_stream_handle(index: int) -> int:
    """The raw handle of the device's current stream (what Triton's CUDA driver passes)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream
