"""What the host hands the kernels, besides tensors: the mode codes (the kernels compare their NORM and
REDUCTION constexprs with them; the host's op schemas carry them as integers), the Mode record of one
launch, and the column map every backend reads. No triton here: fusedvq's host code imports it on
CPU-only installs too.

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
NO_GAP = (0, 0)



class Mode(NamedTuple):
    """What a launch computes: the norm and reduction codes, nan_to_num, the target's gap (at, c) (a hybrid
    decoder's c embedding columns from `at` on, skipped), which gradients are wanted (grad_x, grad_target),
    and whether it is clean_features (z itself, no target)."""

    norm: int = NORM_NONE
    nan_to_num: bool = False
    reduction: int = REDUCTION_MEAN
    gap: tuple = NO_GAP
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

