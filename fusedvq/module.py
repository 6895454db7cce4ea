"""The prepared modules: MaskedMSELoss (the loss) on PreparedColumns, the plumbing it shares with
FeatureCleaner (clean.py): the index and statistics validated once and held as buffers, so that a call
checks only shapes, dtypes and devices and never synchronizes with the GPU."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backend import use_triton_for
from .canonical import check_eps, check_flag, index_tensor, norm_code, option_code, prepare, reduction_code
from .checks import batch_stats_group, check_pair, check_widths
from .checkpoint import FeatureSpec, load_feature_spec
from .columns import ColumnMap
from .contract import BACKENDS, NORM_BATCH, REDUCTIONS, compute_dtype
from .calls import batch_mse_op, masked_mse_op


def load_spec(path, norm: str, num_features: Optional[int], trust: bool, stats) -> FeatureSpec:
    """The FeatureSpec a module with this `norm` needs from a checkpoint (statistics only for "stats")."""
    return load_feature_spec(path, num_features=num_features, trust=trust, stats=stats,
                             require_stats=norm == "stats")


class PreparedColumns(nn.Module):
    """The index and statistics of a fusedvq module, validated once and held as buffers (they move with
    .to()). Everything that needs values (index range, mask count, σ finite and > 0, lengths) is checked
    at construction; a call checks only shapes, dtypes and devices, so it never synchronizes with the GPU
    and can be compiled with torch.compile(fullgraph=True) or captured in a CUDA graph. Statistics are
    held in float32 (the compute dtype of every Triton path)."""

    def __init__(self, index, mean=None, std=None, *, num_features: Optional[int] = None, norm: str = "stats",
                 eps: float = 1e-8, nan_to_num: bool = False, backend: str = "auto",
                 stats_space: Optional[str] = None, sync_stats: bool = False, process_group=None):
        super().__init__()
        self.norm_id = norm_code(norm)
        eps, nan_to_num = check_eps(eps), check_flag("nan_to_num", nan_to_num)
        option_code("backend", backend, BACKENDS)  # the features' device decides per call what runs
        if self.norm_id != NORM_BATCH and (sync_stats or process_group is not None):
            raise ValueError(f'sync_stats / process_group apply to norm="batch" only, not norm={norm!r}')
        device = index.device if isinstance(index, torch.Tensor) else torch.device("cpu")
        index_t = index_tensor(index, device, num_features)  # the functional forms' checks of its kind
        if index_t.dtype == torch.bool:
            if num_features is not None and num_features != index_t.shape[0]:
                raise ValueError(
                    f"feature_mask has {index_t.shape[0]} entries but num_features={num_features}: "
                    f"the mask needs one entry per feature column"
                )
            num_features = index_t.shape[0]
        elif num_features is None:
            raise ValueError("integer indices need num_features=D (the features' width) to be validated")
        columns, self.selector, shift, scale = prepare(
            index_t, mean, std, num_features, None, self.norm_id, stats_space, torch.float32, index_t.device
        )
        self.register_buffer("index", columns.index, persistent=False)
        self.register_buffer("inv_ptr", columns.inv_ptr, persistent=False)
        self.register_buffer("inv_k", columns.inv_k, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.norm, self.eps, self.nan_to_num, self.backend = norm, eps, nan_to_num, backend
        self.sync_stats, self.process_group = sync_stats, process_group

    @classmethod
    def from_checkpoint(cls, path, *, norm: str = "stats", num_features: Optional[int] = None, trust: bool = False,
                        stats=None, **options):
        """The module a VQ-VAE checkpoint (file or folder) describes: its mask, and its statistics for
        norm="stats"; see fusedvq.load_feature_spec (num_features, trust, stats). options as in the
        constructor."""
        return cls.from_spec(load_spec(path, norm, num_features, trust, stats), norm=norm, **options)

    @classmethod
    def from_spec(cls, spec: FeatureSpec, *, norm: str = "stats", **options):
        """The module for a FeatureSpec (fusedvq.load_feature_spec): its mask, and its statistics for
        norm="stats"."""
        return cls(spec.feature_mask, **spec.stats_arguments(norm), norm=norm, **options)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the statistics; .half() / .to(dtype) on an enclosing model must not round μ and
        # 1/σ to 16 bits (the result would be wrong for every input dtype), so they keep float32.
        kept = {name: getattr(self, name) for name in ("shift", "scale") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    @property
    def num_features(self) -> int:
        return self.inv_ptr.shape[0] - 1

    @property
    def num_kept(self) -> int:
        return self.index.shape[0]

    @property
    def synced(self) -> bool:
        return self.sync_stats or self.process_group is not None

    def columns(self) -> ColumnMap:
        # Read from the buffers on every call (not cached): functional_call and DataParallel swap them.
        return ColumnMap(self.index, self.inv_ptr, self.inv_k)

    def _prepare_call(self, features: torch.Tensor, target: Optional[torch.Tensor], skipped: int = 0):
        """(columns, use_triton, group) of a call, after its shape / dtype / device checks."""
        check_pair(features, target, allow_empty=self.synced)
        columns = self.columns()
        check_widths(features, target, columns, self.selector, skipped, "loss(features [B, {}], target [B, {}])")
        if columns.index.device != features.device:
            raise ValueError(
                f"features are on {features.device} but the module's buffers are on {columns.index.device}: "
                f"call .to({str(features.device)!r}) on the {type(self).__name__}"
            )
        group = ""
        if self.norm_id == NORM_BATCH:
            group = batch_stats_group(self.norm_id, self.sync_stats, self.process_group, features.shape[0])
        return columns, use_triton_for(self.backend, features), group

    def _stats_for(self, features: torch.Tensor):
        """(shift, scale) in the features' compute dtype (float64 features: float32 statistics, widened)."""
        shift, scale = self.shift, self.scale
        cdt = compute_dtype(features.dtype)
        if shift is not None and shift.dtype != cdt:
            shift, scale = shift.to(cdt), scale.to(cdt)
        return shift, scale

    def extra_repr(self) -> str:
        synced = ", sync_stats=True" if self.synced else ""
        return (f"kept={self.num_kept} of {self.num_features} feature columns, norm={self.norm!r}{synced}, "
                f"nan_to_num={self.nan_to_num}, backend={self.backend!r}")


class MaskedMSELoss(PreparedColumns):
    """masked_mse with the index and statistics prepared once and held as buffers (PreparedColumns).

    Args:
        index: bool mask [D] or integer column indices [K] (then pass num_features=D).
        mean, std: μ, σ of length D or K (see masked_mse); required for norm="stats".
        num_features: D; needed with integer indices, checked against the mask's length otherwise.
        norm, eps, nan_to_num, reduction, backend, stats_space, sync_stats, process_group: as in
            masked_mse (norm="batch" takes no mean/std; sync_stats pools its statistics across ranks).
        target_gap: (at, width): the target holds `width` more columns, from column `at` on, that the loss
            skips (a hybrid VQ-VAE decoder's embedding columns): target [B, K + width], read in place, its
            gradient zero there. VQReconLoss.from_checkpoint sets it from the checkpoint.
    """

    def __init__(self, index, mean=None, std=None, *, reduction: str = "mean", target_gap=(0, 0), **options):
        reduction_id = reduction_code(reduction)  # checked first, as masked_mse does
        super().__init__(index, mean, std, **options)
        self.reduction_id, self.reduction = reduction_id, reduction
        self.target_gap = check_gap(target_gap, self.num_kept)

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gap = self.target_gap
        columns, use_triton, group = self._prepare_call(features, target, gap[1])
        if self.norm_id == NORM_BATCH:
            return batch_mse_op(features, target, columns, self.eps, self.nan_to_num, self.reduction_id, use_triton,
                                group, gap)
        shift, scale = self._stats_for(features)
        return masked_mse_op(features, target, columns, shift, scale, self.nan_to_num, self.reduction_id, use_triton,
                             gap)

    def extra_repr(self) -> str:
        gap = f", target_gap={self.target_gap}" if self.target_gap[1] else ""
        return super().extra_repr() + f", reduction={REDUCTIONS[self.reduction_id]!r}{gap}"


def check_gap(target_gap, num_kept: int) -> tuple[int, int]:
    """(at, width) with 0 <= at <= K and width >= 0, or a ValueError naming them."""
    ok = (isinstance(target_gap, (tuple, list)) and len(target_gap) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in target_gap))
    if not ok or not 0 <= target_gap[0] <= num_kept or target_gap[1] < 0:
        raise ValueError(f"target_gap must be (at, width) with 0 <= at <= {num_kept} (the kept columns) and "
                         f"width >= 0, got {target_gap!r}")
    return int(target_gap[0]), int(target_gap[1])
