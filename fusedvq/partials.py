"""P partial reconstructions against one target: a categorical, hierarchical VQ-VAE's N×L partial decoders
each reconstruct the whole input, and its training adds the informativeness loss

    sum(F.mse_loss(partial, target) for partial in partials) / P

Here the target is the cleaned features z = clean_features(features) [B, K] (any norm; normalized and
gathered once) — for a hybrid with its embeddings [B, c], combine(z, embeddings) [B, K + c], read in place —
the P partials come as one [P, B, K (+ c)] tensor or the list a model returns, and one pass each way gives
the loss ("mean"), or each partial's column errors ("column", [P, K], a hybrid objective's [P, K + c]) whose
mean is that loss and from which category_errors gives the per-category metric as the project computes it
(each category's error averaged over its own partials, on its own columns; partial_categories.py), all on
the device without a host synchronization. reference.py (partials_composed) states the math;
ops/partials.py routes and registers it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops
from .arguments import cache_plan, check_gap, option_code, prepare
from .cpu.partials_small import PartialsRoute
from .kernels.plan import REDUCTION_COLUMN, REDUCTION_MEAN
from .loss import PlannedModule, cached_plan, plan_key
from .ops.hybrid import check_partial_embeddings
from .ops.partials import PartialsMode, call_partials
from .partial_categories import category_errors_of, partial_category_errors, partial_category_layout
from .strict import check_spec

PARTIALS_REDUCTIONS = {"mean": REDUCTION_MEAN, "column": REDUCTION_COLUMN}
_REDUCTION_NAMES = {code: name for name, code in PARTIALS_REDUCTIONS.items()}
_STRIDED = torch.strided


def partials_mse(features: torch.Tensor, partials, index, mean=None, std=None, *, norm: str = "stats",
                 reduction: str = "mean", target_gap=(0, 0), embeddings=None, **options) -> torch.Tensor:
    """The mean over P of each partial reconstruction's MSE against the cleaned features (the informativeness
    loss), or each partial's column errors.

    Args:
        features: x [B, D], as in fusedvq.masked_mse (float64 on the reference backend).
        partials: r [P, B, K (+ c)] in the features' dtype, any strides, or a list of P [B, K (+ c)] tensors
            (what a model's partial decoders return). On the CPU (eager) a list is read in place and each
            partial gets a gradient of its own; on the Triton path and while torch.compile traces it is
            stacked once: one copy of its P·B·(K + c) elements forward (about as much memory traffic as the
            loss's own forward), its backward handing each partial a view of one gradient buffer.
        index, mean, std, norm and the options eps, nan_to_num, backend, stats_space, sync_stats,
            process_group: the target's, as in fusedvq.clean_features (z = clean_features(features, ...)).
        reduction: "mean": Σ (r − z)² / (P·B·K), a scalar (= the mean over p of F.mse_loss(r[p], z));
            "column": E[p, k] = Σ_b (r[p, b, k] − z[b, k])² / B, [P, K] (E.mean() is the "mean" loss).
        target_gap: (at, c): each partial holds c more columns from `at` on (a hybrid decoder's embedding
            columns), skipped as masked_mse skips them (zero gradient there).
        embeddings: with a target_gap (at, c), a hybrid's embeddings [B, c] (in the partials' dtype): the
            hybrid's objective instead, each partial against combine(z, embeddings) = [z[:, :at], embeddings,
            z[:, at:]] over all K + c columns — exactly the mean over p of F.mse_loss(partial_p, combined),
            the embeddings read in place — "column" giving [P, K + c] in the partials' (decoder) column order,
            the mean dividing by P·B·(K + c); the embeddings get a gradient when they require one.

    Returns the loss in the features' dtype (float32 under autocast); gradients flow to the features (through
    the normalization, norm="batch" included) and to the partials.
    """
    ops.check_pair(features, None)
    given, tensors = {"norm": norm, **options}, (index, mean, std)
    key = plan_key("clean", features, None, tensors, given)  # (clean_features' plan: z's)
    cached = cached_plan(key, tensors) or cache_plan(key, tensors, prepare(
        index, mean, std, given, num_features=features.shape[1], num_kept=_traced_kept(partials, target_gap),
        device=features.device, dtype=ops.COMPUTE_DTYPE.get(features.dtype, torch.float32)), ops.small_route)
    plan = cached.plan
    mode = _mode(reduction, check_gap(target_gap, plan.columns.index.shape[0]))
    small = PartialsRoute.of(plan, mode)
    loss = None if small is None else small(features, partials, embeddings)  # (a small CPU batch: as the module's)
    return _call(features, partials, embeddings, plan, cached.route, mode) if loss is None else loss


def _traced_kept(partials, target_gap) -> Optional[int]:
    """While torch.compile traces: K as the partials' width says (W − c), which sizes a traced mask's gather
    statically (as masked_mse's target does; a mask keeping another count fails on the device). Else None:
    the eager checks count the mask and compare the widths."""
    one = partials[0] if isinstance(partials, (list, tuple)) and partials else partials
    if not (torch.compiler.is_compiling() and isinstance(one, torch.Tensor) and one.dim() >= 2):
        return None
    width = target_gap[1] if isinstance(target_gap, (tuple, list)) and len(target_gap) == 2 else 0
    return one.shape[-1] - width if isinstance(width, int) and 0 <= width < one.shape[-1] else None


def _mode(reduction: str, gap: tuple) -> PartialsMode:
    """The op's mode without its backend (the call's features choose it)."""
    option_code("reduction", reduction, tuple(PARTIALS_REDUCTIONS))
    return PartialsMode(PARTIALS_REDUCTIONS[reduction], gap.at, gap.width, False)


def _call(features, partials, embeddings, plan, route, mode: PartialsMode) -> torch.Tensor:
    partials = partials_form(partials)
    if torch.is_autocast_enabled(features.device.type):  # as F.mse_loss: float32 compute and result
        features = features.float()
        partials = partials.float() if isinstance(partials, torch.Tensor) else [p.float() for p in partials]
        embeddings = embeddings.float() if isinstance(embeddings, torch.Tensor) else embeddings
    check_partials(features, partials, plan.columns.index.shape[0], mode, embeddings)
    z = ops.call_clean(features, plan, route)
    return call_partials(z, partials, mode._replace(use_triton=ops.use_triton_for(plan.backend, features)), embeddings)


def partials_form(partials):
    """The partials as given, checked: a [P, B, W] tensor, or a list of P [B, W] tensors of one shape, dtype and
    device (a tuple becomes a list)."""
    if isinstance(partials, torch.Tensor):
        ops.check_dense(partials, "partials")
        if partials.dim() != 3:
            raise ValueError(f"partials must be [P, B, W] (or a list of P [B, W] tensors), got shape "
                             f"{tuple(partials.shape)}")
        return partials
    if not isinstance(partials, (list, tuple)):
        raise TypeError(f"partials must be a [P, B, W] tensor or a list of [B, W] tensors, got "
                        f"{type(partials).__name__}")
    if not partials:
        raise ValueError("partials is an empty list: give at least one partial reconstruction")
    first = partials[0]
    if type(first) is torch.Tensor and first.layout is _STRIDED and first.dim() == 2 and first.device.type != "meta":
        # the common case in one pass (µs count at B = 4, 24 partials); the loop below says what is wrong
        shape, dtype, device = first.shape, first.dtype, first.device
        if all(type(t) is torch.Tensor and t.layout is _STRIDED and not t.is_nested and t.shape == shape
               and t.dtype is dtype and t.device == device for t in partials):
            return list(partials)
    for p, t in enumerate(partials):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"partials[{p}] must be a torch.Tensor, got {type(t).__name__}")
        ops.check_dense(t, f"partials[{p}]")
        if t.dim() != 2 or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"partials[{p}] is {t.dtype} {tuple(t.shape)} on {t.device}, but partials[0] is "
                             f"{first.dtype} {tuple(first.shape)} on {first.device}: every partial must be [B, W] "
                             f"with one dtype and device")
    return list(partials)


def check_partials(features: torch.Tensor, partials, num_kept: int, mode: PartialsMode, embeddings=None) -> None:
    """partials (partials_form's) [P, B, K + c] matching the features [B, D] in dtype, device and batch size
    (c = mode.gap_width), and the embeddings, when given, [B, c] in the partials' dtype and device."""
    gap_width = mode.gap_width
    one = partials if isinstance(partials, torch.Tensor) else partials[0]
    P, (B, W) = (one.shape[0], one.shape[1:]) if one is partials else (len(partials), one.shape)
    if P == 0:
        raise ValueError("partials holds no partial reconstruction (P = 0)")
    if one.dtype != features.dtype:
        raise TypeError(f"features and partials must share one dtype, got features {features.dtype} and partials "
                        f"{one.dtype}")
    if one.device != features.device:
        raise ValueError(f"features are on {features.device} but partials are on {one.device}")
    if B != features.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but the partials have {B}: the batch sizes must "
                         f"match")
    if W != num_kept + gap_width:
        skipped = f" and the {gap_width} columns the loss skips (target_gap)" if gap_width else ""
        raise ValueError(f"partials have {W} columns but must have {num_kept + gap_width}: the {num_kept} kept "
                         f"columns{skipped}")
    if embeddings is not None:
        check_partial_embeddings(embeddings, B, one, mode.gap)


class PartialsMSELoss(PlannedModule):
    """partials_mse with the index and statistics prepared once and held as buffers (as MaskedMSELoss), and
    the categories' layout for the per-category metric.

    Args:
        index, mean, std, num_features, reduction, target_gap and the options: as in partials_mse and
            MaskedMSELoss (from_checkpoint / from_spec build it from a VQ-VAE checkpoint, categories included;
            a hybrid's target_gap and decoder_categories too).
        categories: {name: kept-column indices}, in the VQ-VAE's order (its group_indices).
        decoder_categories: with a target_gap (at, c), the same categories in the decoder's K + c columns (a
            hybrid's model_config group_indices: the INITIAL category holds the c embedding columns).
        levels: L, for the N×L layout of a categorical hierarchical VQ-VAE: P = N·L partials, category n's
            are n·L .. n·L + L − 1 (its decode_partial order).
        partial_categories: instead of levels, the category (name or position) of each of the P partials.

    category_errors(errors [P, K + c]) (the "column" output with embeddings; [P, K] without a gap) gives [C]:
    category n's MSE on its own decoder columns, averaged over its own partials — the project's
    `{category}/reconstruction_mse` of one batch; feature_category_errors(errors [P, K]) the same over the
    kept feature columns (the errors without embeddings).
    """

    def __init__(self, index, mean=None, std=None, *, reduction: str = "mean", target_gap=(0, 0),
                 levels: Optional[int] = None, partial_categories: Optional[Sequence] = None, **options):
        decoder_categories = options.pop("decoder_categories", None)
        super().__init__(index, mean, std, **options)
        gap = check_gap(target_gap, self.num_kept)
        self.partials_mode = _mode(reduction, gap)
        self._set_categories(decoder_categories, gap.width)  # (the decoder's K + c columns' categories)
        self._hold_small()
        self.layout = self.decoder_layout = None
        if levels is None and partial_categories is None:
            return
        if not self.categories:
            raise ValueError("levels / partial_categories need the VQ-VAE's categories: pass categories= (or build the "
                             "module with from_checkpoint / from_spec)")
        decoder = self.decoder_categories if gap.width else {}  # (without a gap: the kept columns' layout)
        for space, categories, width in (("", self.categories, self.num_kept),
                                         ("decoder_", decoder, self.num_kept + gap.width)):
            if categories:
                layout = partial_category_layout(categories, width, levels=levels,
                                                 partial_categories=partial_categories, device=self.index.device)
                for field, name in _GATHERS.items():
                    self.register_buffer(space + name, getattr(layout, field), persistent=False)
                setattr(self, space + "layout", layout)

    @classmethod
    def from_spec(cls, spec, *, norm: str = "stats", **options):
        """As PlannedModule.from_spec; for a hybrid VQ-VAE (spec.hybrid) the partials are the decoder's K + c
        columns wide: target_gap (at, c) and decoder_categories come from the spec unless given."""
        check_spec(cls, spec)
        if spec.hybrid is not None:
            gap = options.setdefault("target_gap", (spec.hybrid.gap_at, spec.hybrid.gap_width))
            if isinstance(gap, (tuple, list)) and len(gap) == 2 and gap[1]:
                options.setdefault("decoder_categories", spec.decoder_categories or None)
        return super().from_spec(spec, norm=norm, **options)

    def forward(self, features: torch.Tensor, partials, embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss of features [B, D] against partials [P, B, K + c] (or a list); embeddings [B, c]: the
        hybrid's objective (partials_mse)."""
        held, small = ops.held_plan(self), self._small
        if small[0] is not held:  # (the buffers were swapped: a route of the new plan)
            small = self._hold_small()
        if small[1] is not None:  # a small CPU batch: one node each way (cpu/partials_small.py)
            loss = small[1](features, partials, embeddings)
            if loss is not None:
                return loss
        return _call(features, partials, embeddings, held.plan, held.route, self.partials_mode)

    def category_errors(self, errors: torch.Tensor) -> torch.Tensor:
        """E [C] in decoder columns, as the trainer logs its `{category}/reconstruction_mse`: from the
        [P, K + c] errors of reduction="column" with embeddings (a hybrid's objective; [P, K] without a
        target_gap), each category over its decoder columns and its own partials; in errors' dtype, on their
        device, differentiable, no host synchronization."""
        K, c = self.num_kept, self.partials_mode.gap_width
        if not c:
            return self._by_category(errors, "")
        if isinstance(errors, torch.Tensor) and errors.dim() == 2 and errors.shape[1] == K and self.layout is not None:
            raise ValueError(
                f'category_errors takes the [{errors.shape[0]}, {K + c}] errors of the hybrid objective (reduction='
                f'"column" with embeddings=: the decoder\'s K + c = {K} + {c} columns), got [{errors.shape[0]}, {K}]: '
                f"the errors of the {K} kept feature columns alone; pass embeddings= to the loss, or use "
                f"feature_category_errors(errors) for the categories over the kept feature columns")
        if self.layout is not None and self.decoder_layout is None:
            raise ValueError(f"category_errors averages over the decoder's {K + c} columns (K + c = {K} + {c}), and "
                             f"this module has no categories in decoder columns: build it with from_checkpoint / "
                             f"from_spec (model_config's group_indices), or pass decoder_categories={{name: decoder-"
                             f"column indices}}; feature_category_errors(errors) gives them over the {K} kept "
                             f"feature columns")
        return self._by_category(errors, "decoder_", f"the decoder's K + c = {K} + {c} columns")

    def feature_category_errors(self, errors: torch.Tensor) -> torch.Tensor:
        """E [C] over the kept feature columns: from the [P, K] errors of reduction="column" without embeddings
        (a hybrid's feature columns alone: a different objective); category_errors when there is no gap."""
        return self._by_category(errors, "", f"the K = {self.num_kept} kept feature columns", "feature_category_errors")

    def _by_category(self, errors, space: str, columns: str = "", method: str = "category_errors") -> torch.Tensor:
        layout = getattr(self, space + "layout")
        if layout is None:
            raise ValueError("this module has no partials' categories: pass categories= and levels= (or "
                             "partial_categories=)")
        held = layout._replace(**{field: getattr(self, space + name) for field, name in _GATHERS.items()})
        return category_errors_of(errors, held, method, columns)

    def _apply(self, fn, recurse=True):
        coefs = {name: getattr(self, name, None) for name in ("gather_coef", "decoder_gather_coef")}
        super()._apply(fn, recurse)
        for name, coef in coefs.items():  # kept float64: .half() and .float() would round it
            if coef is not None and getattr(self, name).dtype != coef.dtype:
                setattr(self, name, coef.to(getattr(self, name).device))
        self._hold_small()
        return self

    def _hold_small(self) -> tuple:
        """(the held plan, its PartialsRoute), kept: built with the held plan, for a first compiled call."""
        small = (self._held, PartialsRoute.of(self._held.plan, self.partials_mode))
        object.__setattr__(self, "_small", small)
        return small

    reduction = property(lambda self: _REDUCTION_NAMES[self.partials_mode.reduction])
    target_gap = property(lambda self: self.partials_mode.gap)
    num_partials = property(lambda self: None if self.layout is None else self.layout.num_partials,
                            doc="P of the categories' layout (None without one)")

    def extra_repr(self) -> str:
        gap = f", target_gap={tuple(self.target_gap)}" if self.target_gap.width else ""
        layout = f", partials={self.num_partials} over {len(self.layout.names)} categories" if self.layout else ""
        return super().extra_repr() + f", reduction={self.reduction!r}{gap}{layout}"


# A layout's tensors, held as buffers (they move with the module): its field → the buffer's name
_GATHERS = {"partials": "partial_gather", "columns": "column_gather", "coef": "gather_coef"}

__all__ = ["partials_mse", "PartialsMSELoss", "partial_category_errors"]
