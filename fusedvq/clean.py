"""clean_features / FeatureCleaner: the VQ-VAE encoder's input, z = the normalized kept feature columns.

    z = fusedvq.clean_features(features [B, D], feature_mask [D], norm="batch", nan_to_num=True)   # [B, K]
    recon = decoder(quantize(encoder(z)))
    loss = F.mse_loss(recon, z)          # z is the encoder's input and the loss's target: one pass, not two

The same math as masked_mse up to z (reference.py): nan_to_num, normalization by given or batch
statistics, then the K kept columns in the index's order. Gradients flow to the features: zero in dropped
columns, accumulated over duplicate indices, zero at non-finite entries with nan_to_num, and through the
batch statistics for norm="batch". Used twice in a step (encoder input and loss target), autograd adds the
two gradients as for any tensor.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .arguments import OPTIONS, REDUCTIONS, ColumnMap, LossForm, cache_plan, prepare
from .kernels.plan import NO_GAP, Gap
from .strict import check_flag, check_spec, option_code, refuse_unknown
from .weights import kept_weight, module_weight

CLEAN_TAKES = ("index", "mean", "std", *OPTIONS)
from .loss import PlannedModule, cached_plan, plan_key
from .reference import loss_columns


def clean_features(features: torch.Tensor, index, mean=None, std=None, *, norm: str = "stats",
                   **options) -> torch.Tensor:
    """The normalized kept columns of features, z [B, K] in the features' dtype.

    Args:
        features: x [B, D], float32 / float16 / bfloat16 (float64 on the reference backend), any strides.
        index: a bool mask [D] (True = kept) or integer column indices [K] (duplicates allowed): z's columns
            are the kept ones, in the index's order.
        mean, std, norm, and the options eps, nan_to_num, backend, stats_space, sync_stats, process_group: as
            in fusedvq.masked_mse. norm="batch" normalizes with this batch's own column mean and unbiased
            std (σ < eps → 1) and passes z through nan_to_num; it needs B >= 2 (or sync_stats).

    Its arguments are validated (values included: one host synchronization on CUDA) and cached as
    masked_mse's are: a call with the same tensors, unchanged, skips that; FeatureCleaner validates once.
    """
    given, tensors = {"norm": norm, **options}, (index, mean, std)
    key = plan_key("clean", features, None, tensors, given)
    cached = cached_plan(key, tensors)
    if cached is None:
        refuse_unknown(options, CLEAN_TAKES, "clean_features")
        synced = norm == "batch" and (check_flag("sync_stats", options.get("sync_stats", False))
                                      or options.get("process_group") is not None)
        ops.check_pair(features, None, allow_empty=bool(synced))
        plan = prepare(index, mean, std, given, num_features=features.shape[1], device=features.device,
                       dtype=ops.COMPUTE_DTYPE.get(features.dtype, torch.float32))
        cached = cache_plan(key, tensors, plan, ops.small_route)
    else:  # (masked_mse's plan cache: an identical call passed every check of these arguments)
        ops.check_pair(features, None)
    return ops.call_clean(features, cached.plan, cached.route)


class FeatureCleaner(PlannedModule):
    """clean_features with the index and statistics prepared once and held as buffers: a call checks only
    shapes, dtypes and devices (no host synchronization), so a step using it compiles with
    torch.compile(fullgraph=True) and is captured by CUDA graphs.

    Args:
        index: bool mask [D] (the VQ-VAE's feature_mask) or integer column indices [K] (then pass
            num_features=D).
        mean, std: μ, σ of length D or K; required for norm="stats".
        num_features and the options norm, eps, nan_to_num, backend, stats_space, sync_stats, process_group:
            as in MaskedMSELoss.
        weight, categories, decoder_categories: recon_loss's per-column weights and the VQ-VAE's categories
            (in kept feature columns, and for a hybrid in decoder columns), as in MaskedMSELoss (from_checkpoint
            / from_spec take both from the checkpoint).

    from_checkpoint(path, norm=..., ...) builds it from a VQ-VAE checkpoint, as the losses do.
    """

    _TAKES = ("index", "mean", "std", "num_features", "weight", "categories", "decoder_categories", *OPTIONS)

    def __init__(self, index, mean=None, std=None, *, weight=None, categories=None, _gap=NO_GAP, **options):
        # (_gap: from_spec's hybrid layout's Gap, known before the weight is checked: [K + c] weights then fit)
        super().__init__(index, mean, std, categories=categories, _decoder_gap=_gap, **options)
        self.hybrid = None  # a hybrid VQ-VAE's layout, when built from its checkpoint
        # recon_loss compares z with the decoder's columns through the identity plan on z's K columns.
        K, device = self.num_kept, self.index.device
        self._z_plan = prepare(torch.arange(K, device=device), options={"norm": "none", "backend": self.backend},
                               num_features=K, form=LossForm(gap=_gap))
        self._z_plan = self._z_plan._replace(weight=module_weight(weight, self.categories, K, device,
                                                                  self._z_plan.gap.width))
        self._hold_z()

    @classmethod
    def from_spec(cls, spec, *, norm: str = "stats", **options) -> "FeatureCleaner":
        """The cleaner for a FeatureSpec. For a hybrid VQ-VAE (spec.hybrid) z holds the K feature columns;
        `combine(z, embeddings)` builds the encoder's K + c input, `recon_loss(recon, z)` compares the
        decoder's feature columns with z, and `recon_columns` says which decoder columns those are (the c
        others are the embeddings, left to the caller)."""
        check_spec(cls, spec)
        gap = NO_GAP if spec.hybrid is None else Gap(spec.hybrid.gap_at, spec.hybrid.gap_width)
        if spec.hybrid is not None:
            options.setdefault("decoder_categories", spec.decoder_categories or None)
        cleaner = super().from_spec(spec, norm=norm, _gap=gap, **options)
        cleaner.hybrid = spec.hybrid
        return cleaner

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        z_columns, weight, device = self._z_plan.columns, self._z_plan.weight, self.index.device
        if z_columns.index.device != device:  # the identity plan follows the buffers' device
            self._z_plan = self._z_plan._replace(columns=ColumnMap(*(t.to(device) for t in z_columns)),
                                                 weight=None if weight is None else weight.to(device))
        self._hold_z()
        return self

    def _hold_z(self) -> None:
        """recon_loss's plans, each reduction's with its small route, built with the z plan (as the held plan:
        a first call under torch.compile must find them, not change the module)."""
        plans = [self._z_plan._replace(reduction=code, selector="cleaner's z") for code in range(len(REDUCTIONS))]
        self._z_held = (self._z_plan, [(plan, ops.small_route(plan)) for plan in plans])  # (by reduction code)

    def _loss_weight(self):
        return kept_weight(self._z_plan.weight, self.num_kept, self._z_plan.gap)  # (recon_loss's weights)

    def _objective_weight(self):
        return self._z_plan.weight  # (recon_loss's weights as given: [K], or [K + c] per decoder column)

    @property
    def gap(self) -> Gap:
        """The decoder's embedding columns, gap.width of them from column gap.at on (NO_GAP unless hybrid)."""
        return self._z_plan.gap

    @property
    def recon_columns(self) -> torch.Tensor:
        """[K] int64 on the buffers' device: the decoder column that reconstructs each column of z."""
        return loss_columns(self.num_kept, *self.gap, self.index.device)

    def combine(self, z: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Hybrid: the encoder's input [B, K + c], z's columns with the c embedding columns inserted at the
        decoder's first embedding column (what the hybrid model does with its initial encoder's output)."""
        if self.hybrid is None:
            raise ValueError("combine() is for hybrid VQ-VAEs; this cleaner's VQ-VAE has no embedding columns")
        (p, c), K = self.gap, self.num_kept
        if z.dim() != 2 or z.shape[1] != K:
            raw = (" (the raw features: pass z = cleaner(features))"
                   if z.dim() == 2 and z.shape[1] == self.num_features else "")
            raise ValueError(f"z must be [B, {K}] (the cleaned features, K = {K} kept columns), got "
                             f"{list(z.shape)}{raw}")
        if embeddings.dim() != 2 or embeddings.shape[1] != c or embeddings.shape[0] != z.shape[0]:
            raise ValueError(f"embeddings must be [{z.shape[0]}, {c}] (the initial encoder's output), got "
                             f"{list(embeddings.shape)}")
        return torch.cat([z[:, :p], embeddings.to(z.dtype), z[:, p:]], dim=1)

    def recon_loss(self, recon: torch.Tensor, z: torch.Tensor, reduction: str = "mean",
                   embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """F.mse_loss(recon[:, recon_columns], z) without the gather: recon [B, K] (hybrid: [B, K + c]) is
        read in place, its embedding columns skipped (zero gradient); gradients flow to recon and z.
        reduction: "mean", "sum", "none" [B, K], or "column" [K] (category_errors takes it); e = w·(z − r)²
        with the cleaner's weight, the mean dividing by B·K.
        embeddings [B, c] (hybrid): the trainer's objective instead, F.mse_loss(recon, combine(z, embeddings))
        over all K + c decoder columns, read in place (no combined copy): [B, K + c] / [K + c] for "none" /
        "column", gradients to recon, z and the embeddings."""
        if self._z_held[0] is not self._z_plan:  # (the z plan was replaced)
            self._hold_z()
        held = self._z_held[1][option_code("reduction", reduction, REDUCTIONS)]
        # Said in this method's order (recon first), before the routing point's own checks run.
        for name, t in (("recon", recon), ("z", z)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}: recon_loss(recon, z)")
        ops.check_order(recon, z, self.num_kept + self.gap.width, self.num_kept, "recon_loss(recon [B, {}], z [B, {}])")
        return ops.call_loss(z, recon, held[0], "recon_loss(recon [B, {1}], z [B, {0}])", held[1], embeddings)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] → z [B, K], the encoder's input."""
        held = ops.held_plan(self)
        return ops.call_clean(features, held.plan, held.route)
