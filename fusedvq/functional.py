"""masked_mse(): the functional form of the loss."""

from __future__ import annotations

from typing import Optional

import torch

from .backend import use_triton_for
from .canonical import check_eps, check_flag, norm_code, prepare, reduction_code
from .checks import _is_tracing, batch_stats_group, check_order, check_pair, check_widths
from .contract import NORM_BATCH, compute_dtype
from .calls import batch_mse_op, masked_mse_op


def masked_mse(
    features: torch.Tensor,
    target: torch.Tensor,
    index,
    mean=None,
    std=None,
    *,
    norm: str = "stats",
    eps: float = 1e-8,
    nan_to_num: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    stats_space: Optional[str] = None,
    sync_stats: bool = False,
    process_group=None,
) -> torch.Tensor:
    """Squared error between normalized kept feature columns and a reconstruction of them.

    Args:
        features: x [B, D], float32 / float16 / bfloat16 (float64 on the reference backend), any strides.
        target: r [B, K] (the decoder's reconstruction of the K kept columns), same dtype and device.
        index: a bool mask [D] (True = kept) or integer column indices [K] (duplicates allowed; their
            gradients accumulate). Moved to the features' device if it lives elsewhere.
        mean, std: μ, σ per feature column (length D, "raw") or per kept column (length K, "masked"),
            used by norm="stats". When D == K the length cannot tell: pass stats_space.
        norm: "stats" — z = (x[:, index] − μ)/σ; "none" — z = x[:, index]; "batch" — μ, σ are the
            column mean and unbiased std (correction 1) of the batch's kept columns, gradients flow
            through them, and z passes through nan_to_num. Needs B >= 2 (or sync_stats).
        eps: batch-statistics columns with σ < eps use σ = 1, with no gradient through σ (norm="batch").
        nan_to_num: NaN and ±Inf in features become 0 before normalization, with zero gradient there.
        reduction: "mean" (Σ/(B·K)), "sum", or "none" ([B, K]).
        backend: "auto" (Triton for CUDA tensors when triton imports, else reference), "triton",
            "reference".
        stats_space: "raw" or "masked", to say which space mean/std are in (required only when D == K).
        sync_stats: norm="batch" statistics over the rows of all ranks of the default process group
            (SyncBatchNorm's semantics; a rank may have 0 rows, then its loss is 0).
        process_group: like sync_stats, over this torch.distributed process group.

    Returns:
        The loss in the features' dtype (accumulated in float32, or float64 for float64 inputs): a scalar,
        or [B, K] for reduction="none". Gradients flow to features and target.

    Every call validates its arguments, values included (index range, mask count, σ > 0), which costs one
    host synchronization on CUDA; MaskedMSELoss validates once at construction instead. While
    torch.compile traces, value checks are skipped (the kernels still never read out of bounds).
    """
    reduction_id = reduction_code(reduction)
    norm_id, eps, nan_to_num, use_triton, group, columns, shift, scale = prepare_call(
        features, target, index, mean, std, norm, eps, nan_to_num, backend, stats_space, sync_stats, process_group
    )
    if norm_id == NORM_BATCH:
        return batch_mse_op(features, target, columns, eps, nan_to_num, reduction_id, use_triton, group)
    return masked_mse_op(features, target, columns, shift, scale, nan_to_num, reduction_id, use_triton)


def prepare_call(features, target, index, mean, std, norm, eps, nan_to_num, backend, stats_space, sync_stats,
                 process_group):
    """The checks and canonical forms of one masked_mse or clean_features (target None) call:
    (norm code, eps, nan_to_num, use_triton, group key, ColumnMap, shift, scale)."""
    norm_id = norm_code(norm)
    eps, nan_to_num = check_eps(eps), check_flag("nan_to_num", nan_to_num)
    check_pair(features, target, allow_empty=norm_id == NORM_BATCH and (sync_stats or process_group is not None))
    if target is not None:
        _refuse_swapped(features, target, index)
    use_triton = use_triton_for(backend, features)
    group = batch_stats_group(norm_id, sync_stats, process_group, features.shape[0])
    columns, selector, shift, scale = prepare(
        index, mean, std, features.shape[1], None if target is None else target.shape[1], norm_id, stats_space,
        compute_dtype(features.dtype), features.device,
    )  # fmt: skip
    check_widths(features, target, columns, selector)
    return norm_id, eps, nan_to_num, use_triton, group, columns, shift, scale


def _refuse_swapped(features: torch.Tensor, target: torch.Tensor, index) -> None:
    """masked_mse(recon, features, index), in F.mse_loss's habit: said as such when the widths are exactly the
    other way round (features as wide as the kept columns, target as wide as the mask, or for integer indices
    as wide as their largest). Looks at values only when an error is coming anyway (eager, not traced)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or _is_tracing():
        return
    wide, target_wide, n = features.shape[1], target.shape[1], index.shape[0]
    if index.dtype == torch.bool and wide != n == target_wide:
        D, K = n, int(index.sum())
    elif index.dtype in (torch.int32, torch.int64) and n == wide < target_wide:
        if not bool(((index >= 0) & (index < target_wide)).all()) or int(index.max()) < wide:
            return  # indices that fit the features, or fit neither: not a swap
        D, K = target_wide, n
    else:
        return
    check_order(features, target, D, K, "masked_mse(features [B, {}], target [B, {}], index, ...)")
