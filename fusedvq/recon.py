"""VQReconLoss: the drop-in reconstruction loss of a VQ-VAE-guided training loop.

    before:  z = (features - mean) / std            # [B, D]   normalize everything
             loss = F.mse_loss(recon, z[:, mask])   # [B, K]   then keep the decoder's columns
    after:   recon_loss = VQReconLoss.from_checkpoint("vqvae/best_model.pt")   # once
             loss = recon_loss(features, recon)     # features [B, D], recon [B, K]

It is MaskedMSELoss with the VQ-VAE's vocabulary: it is built from a checkpoint (mask, per-category
statistics placed through group_indices) or from an explicit mask and statistics, names the tensors
features / recon in its errors, and keeps the checkpoint's categories and FeatureSpec.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .loss import MODULE_TAKES, MaskedMSELoss
from .ops import check_order
from .strict import check_spec, load_spec, refuse_spec, refuse_unknown

_TAKES = ("feature_mask", *MODULE_TAKES[1:])  # every keyword the constructor takes


class VQReconLoss(nn.Module):
    """Reconstruction loss between extracted features [B, D] and the decoder's reconstruction [B, K].

    loss = mean over (b, k) of (z[b, k] − recon[b, k])², z = the normalized kept columns of features:
        norm="stats": z = (features[:, mask] − μ) / σ with the VQ-VAE's statistics (mean/std or median/mad)
        norm="batch": μ, σ = column mean and std of the batch itself (no statistics needed; see MaskedMSELoss)
        norm="none":  z = features[:, mask] (features already normalized)

    Args:
        feature_mask: bool [D] (True = a column the decoder reconstructs) or kept-column indices [K]
            (then pass num_features=D).
        mean, std: μ, σ per feature column (length D) or per kept column (length K); norm="stats" only.
        categories: optional {name: kept-column indices} (the checkpoint's group_indices): category_errors
            turns the [K] errors of reduction="column" into one per category, and weight may name them.
        decoder_categories: with target_gap, the same categories in decoder columns (a hybrid's model_config
            group_indices; from_checkpoint reads them): category_errors of the [K + c] errors with embeddings=
            averages over them, as the trainer does; feature_category_errors keeps the kept feature columns.
        weight: per-column loss weights: [K] numbers, {category name: weight} (others 1), or "balanced"
            (every category weighs the same in all); e = w·(z − recon)², the mean dividing by B·K.
        options: norm, reduction ("mean", "sum", "none" [B, K], "column" [K]), num_features, target_gap,
            nan_to_num, backend, eps, stats_space, and for
            norm="batch" sync_stats, process_group: as in MaskedMSELoss. target_gap (at, width): recon holds
            `width` embedding columns from column `at` on, which the loss skips (a hybrid VQ-VAE;
            from_checkpoint derives it); recon is then [B, K + width].

    Gradients flow to features (zero in the dropped columns) and to recon. Buffers move with .to().
    """

    def __init__(self, feature_mask, mean=None, std=None, *, categories: Optional[Mapping[str, Sequence[int]]] = None,
                 **options):
        refuse_unknown(options, _TAKES, "VQReconLoss")
        refuse_spec(feature_mask, "feature_mask", "VQReconLoss.from_spec(spec)")
        super().__init__()
        self.hybrid = None  # a hybrid VQ-VAE's layout (set by from_checkpoint / from_spec)
        self.loss = MaskedMSELoss(feature_mask, mean, std, categories=categories, **options)
        self.norm = self.loss.norm
        self.spec = None  # the FeatureSpec when built from a checkpoint

    @classmethod
    def from_checkpoint(cls, path, *, norm: str = "stats", num_features: Optional[int] = None, trust: bool = False,
                        stats=None, **options) -> "VQReconLoss":
        """The loss a VQ-VAE checkpoint (file or folder) declares.

        num_features: the extractor's width D, checked against the checkpoint's mask (a mismatch raises
        with the numbers, as `fusedvq check PATH --features D` reports it). stats: None (the checkpoint's
        own, else normalization_stats.npz beside it), "checkpoint", or an .npz path. trust=True allows
        pickled objects in the file (it can run code; warns). options: reduction, nan_to_num, backend, eps,
        and for norm="batch" sync_stats, process_group. norm="none" / "batch" read no statistics.
        """
        return cls.from_spec(load_spec(cls, path, norm, num_features, trust, stats), norm=norm, **options)

    @classmethod
    def from_spec(cls, spec, *, norm: str = "stats", **options) -> "VQReconLoss":
        """The loss for a FeatureSpec (fusedvq.load_feature_spec). For a hybrid VQ-VAE (spec.hybrid) recon is
        the decoder's whole output, [B, K + c]: the loss compares its feature columns and leaves its c
        embedding columns (spec.embedding_columns) to the caller."""
        check_spec(cls, spec)
        layout = spec.hybrid
        gap = (layout.gap_at, layout.gap_width) if layout is not None else (0, 0)
        if layout is not None:
            options.setdefault("decoder_categories", spec.decoder_categories or None)
        loss = cls(spec.feature_mask, **spec.stats_arguments(norm), categories=spec.categories, norm=norm,
                   target_gap=gap, **options)
        loss.spec, loss.hybrid = spec, layout
        return loss

    @property
    def categories(self) -> dict:
        """{name: kept-column indices}, in the checkpoint's order: the categories over the K kept feature
        columns (a hybrid's pre_model_group_indices)."""
        return self.loss.categories

    @property
    def decoder_categories(self) -> dict:
        """{name: decoder-column indices}, in category_names' order: the categories over the decoder's
        columns (a hybrid's model_config group_indices, the INITIAL category holding the embedding columns;
        the same as categories unless hybrid; {} for a hybrid built without them)."""
        return self.loss.decoder_categories

    @property
    def category_names(self) -> tuple[str, ...]:
        """The categories' names, in the checkpoint's order (of category_errors and feature_category_errors)."""
        return self.loss.category_names

    def category_errors(self, column_errors: torch.Tensor) -> torch.Tensor:
        """Per-category errors [C] (category_names' order) in decoder columns, the trainer's
        `{category}/reconstruction_mse`: from a reduction="column" loss's [K] errors, or a hybrid's [K + c]
        errors with embeddings= (each category over its decoder columns, embedding columns included)."""
        return self.loss.category_errors(column_errors)

    def feature_category_errors(self, column_errors: torch.Tensor) -> torch.Tensor:
        """Per-category errors [C] over the kept feature columns alone, from the [K] errors of a
        reduction="column" loss without embeddings (the same as category_errors unless hybrid)."""
        return self.loss.feature_category_errors(column_errors)

    @property
    def embedding_columns(self) -> range:
        """The decoder columns this loss does not compare (a hybrid's embedding columns; empty otherwise)."""
        gap_at, gap_width = self.loss.target_gap
        return range(gap_at, gap_at + gap_width)

    @property
    def num_features(self) -> int:
        """D, the extractor's width."""
        return self.loss.num_features

    @property
    def num_kept(self) -> int:
        """K, the kept feature columns (the decoder's width, unless hybrid)."""
        return self.loss.num_kept

    @property
    def recon_width(self) -> int:
        """The decoder's width: K, or K + c for a hybrid VQ-VAE."""
        return self.loss.num_kept + self.loss.target_gap.width

    def _check_widths(self, features: torch.Tensor, recon: torch.Tensor) -> None:
        # Shape-only checks (no host sync), worded for this use; MaskedMSELoss checks the rest.
        D, K = self.num_features, self.num_kept
        for name, t in (("features", features), ("recon", recon)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}: loss(features [B, {D}], "
                                f"recon [B, {self.recon_width}])")
        if isinstance(features, torch.Tensor) and isinstance(recon, torch.Tensor):
            check_order(features, recon, D, self.recon_width, "loss(features [B, {}], recon [B, {}])")
        if isinstance(features, torch.Tensor) and features.dim() == 2 and features.shape[1] != D:
            raise ValueError(
                f"features have {features.shape[1]} columns but the VQ-VAE's feature_mask covers {D} "
                f"(keeping {K}): the extractor and the checkpoint disagree about the feature width"
            )
        width = self.recon_width
        if isinstance(recon, torch.Tensor) and recon.dim() == 2 and recon.shape[1] != width:
            extra = (f" and its {width - K} embedding columns (decoder columns {self.embedding_columns.start}.."
                     f"{self.embedding_columns.stop - 1})" if width > K else "")
            raise ValueError(
                f"recon has {recon.shape[1]} columns but the VQ-VAE's decoder reconstructs the {K} kept "
                f"columns of {D}{extra}, {width} in all: pass the decoder's output"
            )

    def forward(self, features: torch.Tensor, recon: torch.Tensor, embeddings: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """features [B, D], recon [B, K] (hybrid: [B, K + c]) → the loss (scalar, [B, K] with reduction="none",
        [K] with "column"), over the kept feature columns. A hybrid with embeddings [B, c] (the initial
        encoder's output): the trainer's objective, one MSE over all K + c decoder columns,
        F.mse_loss(recon, combined) with combined = the normalized kept columns and the embeddings at their
        decoder columns, read in place (no combined copy); [B, K + c] / [K + c] for "none" / "column"."""
        self._check_widths(features, recon)
        return self.loss(features, recon, embeddings)

    def extra_repr(self) -> str:
        cats = f", {len(self.categories)} categories" if self.categories else ""
        if self.recon_width > self.num_kept:
            e = self.embedding_columns
            return (f"features {self.num_features} → recon {self.recon_width} ({self.num_kept} feature columns "
                    f"compared; embedding columns {e.start}..{e.stop - 1} left to the caller){cats}")
        return f"features {self.num_features} → recon {self.num_kept}{cats}"

