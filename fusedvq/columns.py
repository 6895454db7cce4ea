"""The column map: which of the D feature columns each of the K kept columns reads, and the inverse.

Built once per index (by MaskedMSELoss at construction, by masked_mse per call) with device-side torch
ops only: no host synchronization, so building it on CUDA inside a training step is safe.

    index    [K]   int64  index[k] = d, the feature column that kept column k reads (duplicates allowed)
    inv_ptr  [D+1] int32  CSR pointers over the D feature columns: the kept columns reading column d are
                          inv_k[inv_ptr[d] : inv_ptr[d+1]]
    inv_k    [K]   int32  the k's sorted by the column they read (stable: ascending k within a column)

The backward kernels use (inv_ptr, inv_k) to write grad_x as a gather over the D output columns, so
duplicate indices accumulate without atomics and every grad_x element is written exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ColumnMap(NamedTuple):
    index: torch.Tensor  # [K] int64
    inv_ptr: torch.Tensor  # [D+1] int32
    inv_k: torch.Tensor  # [K] int32

    @property
    def num_features(self) -> int:
        """D, the width of the features this map reads from."""
        return self.inv_ptr.shape[0] - 1

    @property
    def num_kept(self) -> int:
        """K, the number of kept columns (the target's width)."""
        return self.index.shape[0]


def build_column_map(index: torch.Tensor, num_features: int) -> ColumnMap:
    """Inverse map of a 1-D int64 `index` [K] with values in [0, num_features)."""
    sorted_cols, order = torch.sort(index, stable=True)
    boundaries = torch.arange(num_features + 1, device=index.device, dtype=index.dtype)
    # inv_ptr[d] = number of kept columns reading a feature column < d.
    inv_ptr = torch.searchsorted(sorted_cols, boundaries, out_int32=True)
    return ColumnMap(index=index, inv_ptr=inv_ptr, inv_k=order.to(torch.int32))
