"""The checks of a call's tensors: types, layouts, ranks, dtypes, devices, batch sizes and widths, all of
them free (no values read, no host synchronization), with errors that name the numbers; and the group key
of norm="batch"'s statistics."""

from __future__ import annotations

from typing import Optional

import torch

from .columns import ColumnMap
from .contract import NORM_BATCH, NORMS


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def check_dense(t: torch.Tensor, name: str, meta: bool = True) -> None:
    """A dense (strided) tensor with data: sparse (COO, CSR, ...) and nested tensors, and tensors on the meta
    device (shapes without values), are not supported by the loss's kernels."""
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor, which fusedvq does not support: pass a dense [rows, columns] tensor")
    if t.layout != torch.strided:
        raise TypeError(
            f"{name} is a sparse tensor ({str(t.layout).replace('torch.', '')}), which fusedvq does not support: "
            f"pass {name}.to_dense()"
        )
    if meta and t.device.type == "meta" and not _is_tracing():
        raise ValueError(f"{name} is on the meta device (a shape without values): fusedvq needs real data")


def check_pair(features: torch.Tensor, target: Optional[torch.Tensor], allow_empty: bool = False) -> None:
    """Types, layouts, ranks, dtypes, devices and batch sizes of x [B, D] and r [B, K] (B = 0 only if
    allowed: a rank without rows still takes part in cross-rank statistics); target None: x alone
    (clean_features)."""
    if target is None:
        _check_features(features, "features")
        check_dense(features, "features")
        if features.shape[0] == 0 and not allow_empty:
            raise ValueError("the batch is empty (0 rows): there is nothing to clean")
        return
    for name, t in (("features", features), ("target", target)):
        _check_features(t, name)
    if features.dtype != target.dtype:
        raise TypeError(
            f"features and target must share one dtype, got features {features.dtype} and target {target.dtype}"
        )
    if features.device != target.device:
        meta = " (the meta device holds shapes without values: fusedvq needs real data)" if "meta" in (
            features.device.type, target.device.type) else ""
        raise ValueError(
            f"features are on {features.device} but target is on {target.device}: put both on one device{meta}"
        )
    check_dense(features, "features")
    if target.shape[0] != features.shape[0]:
        raise ValueError(
            f"features have {features.shape[0]} rows but target has {target.shape[0]}: the batch sizes must match"
        )
    if features.shape[0] == 0 and not allow_empty:
        raise ValueError("the batch is empty (0 rows): the loss of no rows is undefined")


def _check_features(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(t, name, meta=False)  # (meta after the device check: a device mismatch is said first)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, columns], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point (float32, float16, bfloat16 or float64), got {t.dtype}")


def batch_stats_group(norm: int, sync_stats: bool, process_group, batch_size: int) -> str:
    """The op's group key for norm="batch": "" (this batch's statistics) or a process-group key."""
    if norm != NORM_BATCH:
        if sync_stats or process_group is not None:
            raise ValueError(f'sync_stats / process_group apply to norm="batch" only, not norm={NORMS[norm]!r}')
        return ""
    if sync_stats or process_group is not None:
        from .distributed import group_key

        return group_key(process_group)
    if batch_size < 2:
        raise ValueError(
            f'norm="batch" needs at least 2 rows for the unbiased std, got a batch of {batch_size}: use frozen '
            f'statistics (norm="stats"), a larger batch, or sync_stats=True to pool rows across ranks'
        )
    return ""


def check_order(first: torch.Tensor, second: Optional[torch.Tensor], want_first: int, want_second: int,
                signature: str) -> None:
    """Refuse a pair given the other way round (the reconstruction first, as in F.mse_loss(recon, features)):
    `first` has the width `second` should have and the other way round. signature: the call in the right
    order, with {} for the two widths."""
    if second is None or want_first == want_second or first.dim() != 2 or second.dim() != 2:
        return
    if (first.shape[1], second.shape[1]) == (want_second, want_first):
        raise ValueError(
            f"the arguments look swapped: got [B, {first.shape[1]}] then [B, {second.shape[1]}], but the order is "
            + signature.format(want_first, want_second)
        )


def check_widths(features: torch.Tensor, target: Optional[torch.Tensor], columns: ColumnMap, selector: str,
                 skipped: int = 0, signature: Optional[str] = None) -> None:
    """x has the D columns the map was built for and r (when given) its K kept columns (the 171/187
    mismatch), plus the `skipped` columns a hybrid decoder's output holds besides them; signature: the call
    (as in check_order), to say when the two look swapped."""
    D, K = columns.num_features, columns.num_kept
    if signature is not None:
        check_order(features, target, D, K + skipped, signature)
    if features.shape[1] != D:
        raise ValueError(
            f"features have {features.shape[1]} columns but the {selector} was built for {D} feature columns "
            f"(it keeps {K} of {D})"
        )
    if target is not None and skipped and target.shape[1] != K + skipped:
        raise ValueError(
            f"target has {target.shape[1]} columns but must have {K + skipped}: the {K} kept columns and the "
            f"{skipped} columns the loss skips (target_gap)"
        )
    if target is not None and not skipped and target.shape[1] != K:
        raise ValueError(
            f"target has {target.shape[1]} columns but the {selector} keeps {K} of the {D} feature columns "
            f"— pass the decoder's {K}-column reconstruction"
        )
