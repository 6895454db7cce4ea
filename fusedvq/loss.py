"""The loss's public surface: masked_mse (the functional form) and MaskedMSELoss (the index and statistics
prepared once and held as buffers), on PlannedModule, the module base that FeatureCleaner (clean.py) and
VQReconLoss (recon.py) share. Arguments become one Plan (arguments.py), which a functional call finds again
in the plan cache (plan_key, cached_plan); a call goes through the routing point (ops/__init__.py), which
checks its tensors and picks the implementation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from . import ops
from .arguments import (NORMS, OPTIONS, PLAN_CACHE, PLAN_CACHE_LOCK, REDUCTIONS, CachedPlan, ColumnMap, LossForm,
                        cache_plan, prepare, swapped_widths)
from .ops.autograd import under_functorch
from .categories import CategoryErrors, check_categories
from .checkpoint import FeatureSpec
from .strict import check_flag, check_spec, load_spec, refuse_spec, refuse_unknown
from .weights import kept_weight, module_weight

_SIGNATURE = "loss(features [B, {}], target [B, {}])"
_FUNCTIONAL_SIGNATURE = "masked_mse(features [B, {}], target [B, {}], index, ...)"
# Every keyword each form takes, as its unknown-option error lists them (the options of OPTIONS included).
_STATS = ("mean", "std", "num_features")
MASKED_MSE_TAKES = ("index", "mean", "std", "reduction", "weight", *OPTIONS)
MODULE_TAKES = ("index", *_STATS, "reduction", "weight", "categories", "decoder_categories", "target_gap", *OPTIONS)


def masked_mse(features: torch.Tensor, target: torch.Tensor, index, mean=None, std=None, *, norm: str = "stats",
               reduction: str = "mean", weight=None, **options) -> torch.Tensor:
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
        reduction: "mean" (Σe/(B·K)), "sum", "none" (e [B, K]), or "column" (Σ_b e/B [K]: each kept column's
            error over the batch; its mean is the "mean" loss), with e = w[k]·(z − r)².
        weight: per-column weights w [K] (finite, >= 0), or None (w = 1). The weighted mean divides by B·K
            (as PyTorch's weighted losses do), not by Σw.
        options (keywords):
            eps=1e-8: batch-statistics columns with σ < eps use σ = 1, no gradient through σ (norm="batch").
            nan_to_num=False: NaN and ±Inf in features become 0 before normalization, zero gradient there.
            backend="auto": Triton for CUDA tensors when triton imports, else "reference"; or "triton".
            stats_space=None: "raw" or "masked", the space of mean/std (required only when D == K).
            sync_stats=False: norm="batch" statistics over the rows of all ranks of the default process
                group (SyncBatchNorm's semantics; a rank may have 0 rows, then its loss is 0).
            process_group=None: like sync_stats, over this torch.distributed process group.

    Returns the loss in the features' dtype (accumulated in float32, or float64 for float64 inputs): a
    scalar, [B, K] for reduction="none", [K] for "column". Gradients flow to features and target.

    A call with new arguments validates them, values included (index range, mask count, σ > 0: one host
    synchronization on CUDA), and caches the plan: a later call with the same index, mean, std and weight
    objects, unchanged, and the same options and widths (or with the tensors a MaskedMSELoss was just built
    from) checks only its features and target. Unchanged by PyTorch's rule for saved tensors, the version
    counter: a write in place or a .data swap is validated again; a write the counter misses (through a NumPy
    array or a .data alias, torch.distributed's broadcast or all_reduce) is not seen, as by a MaskedMSELoss
    built before it. While torch.compile traces, nothing is cached and value checks are skipped
    (the kernels still never read out of bounds).
    """
    given, tensors = {"norm": norm, **options}, (index, mean, std, weight)
    key = plan_key("loss", features, target, tensors, {**given, "reduction": reduction})
    cached = cached_plan(key, tensors)
    if cached is None:
        refuse_unknown(options, MASKED_MSE_TAKES, "masked_mse")
        if target is None:
            raise TypeError("target must be a torch.Tensor (the decoder's reconstruction [B, K]), got None")
        synced = norm == "batch" and (check_flag("sync_stats", options.get("sync_stats", False))
                                      or options.get("process_group") is not None)
        ops.check_pair(features, target, allow_empty=bool(synced))
        swap = swapped_widths(index, features.shape[1], target.shape[1])  # (masked_mse(recon, features, index))
        if swap is not None:
            ops.check_order(features, target, *swap, _FUNCTIONAL_SIGNATURE)
        plan = prepare(index, mean, std, given, num_features=features.shape[1], num_kept=target.shape[1],
                       form=LossForm(reduction, weight=weight), device=features.device,
                       dtype=ops.COMPUTE_DTYPE.get(features.dtype, torch.float32))
        cached = cache_plan(key, tensors, plan, ops.small_route)
    else:  # (an identical call passed every check of these arguments: this call's own tensors are checked)
        ops.check_pair(features, target)
    return ops.call_loss(features, target, cached.plan, _FUNCTIONAL_SIGNATURE, cached.route)


_KEY_TYPES = frozenset((str, bool, int, float, type(None)))  # the option values a plan key takes


def plan_key(form: str, features, target, tensors: tuple, options: dict) -> Optional[tuple]:
    """A functional call's key in the plan cache (arguments.PLAN_CACHE): form ("loss": masked_mse; "clean":
    clean_features, partials_mse), the features' width, device and compute dtype, the target's width, each
    option as (name, type, value) (True, 1 and "False" never share a plan), each tensor argument as (id,
    data_ptr, shape, stride, dtype, device, version, requires_grad): a write in place bumps the version, a
    .data swap moves the data. None (not cached): traced, torch.func, cross-rank statistics, an option value of
    another type, a tensor argument without storage or version counter (sparse, inference), or not a tensor."""
    pair = (features,) if target is None else (features, target)
    if (any(type(t) is not torch.Tensor or t.is_nested or t.dim() != 2 for t in pair)
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or under_functorch() is not None
            or options.get("sync_stats") is True or options.get("process_group") is not None
            or not all(type(v) in _KEY_TYPES for v in options.values())
            or not all(t is None or type(t) is torch.Tensor for t in tensors)):
        return None
    try:
        tensor_keys = [t if t is None else (id(t), t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version,
                                            t.requires_grad) for t in tensors]
    except RuntimeError:  # (no storage, or no version counter)
        return None
    return (form, features.shape[1], target if target is None else target.shape[1], features.device,
            ops.COMPUTE_DTYPE.get(features.dtype, torch.float32),
            tuple(sorted((n, type(v), v) for n, v in options.items())), *tensor_keys)


def cached_plan(key: Optional[tuple], tensors: tuple) -> Optional[CachedPlan]:
    """The plan cached under key when it was built from these very tensors, else None. A hit stands for an
    identical earlier call whose arguments passed validation: this call skips arguments.prepare and the checks
    before it, and its own features and target are checked."""
    if key is None:
        return None
    with PLAN_CACHE_LOCK:
        cached = PLAN_CACHE.get(key)
        if cached is not None:
            PLAN_CACHE.move_to_end(key)
    alive = cached is not None and all(r is None or r() is t for r, t in zip(cached.refs, tensors))
    return cached if alive else None


def _cache_as_functional(plan, tensors: tuple, options: dict, form: Optional[LossForm]) -> None:
    """Cache a module's plan, built from the caller's tensors, as its functional form's: masked_mse's for a loss,
    else clean_features' and partials_mse's, whose prepare gives it for features [B, D] float32 on its device."""
    (D, K), device = (plan.columns.inv_ptr.shape[0] - 1, plan.columns.index.shape[0]), plan.columns.index.device
    features, target = (torch.empty(0, n, dtype=torch.float32, device=device) for n in (D, K))
    as_called = {"norm": "stats", **options, **({"reduction": form.reduction} if form else {})}
    key = plan_key("loss" if form else "clean", features, target if form else None, tensors, as_called)
    if key is not None:
        cache_plan(key, tensors, plan, ops.small_route, copy=True)


class HeldPlan(NamedTuple):
    """A held plan: a PlannedModule's plan as its buffers hold it now, with its small route, kept between calls
    (ops.held_plan returns it, rebuilt by PlannedModule.hold when the buffers changed)."""

    plan: object  # arguments.Plan with the buffers' tensors
    route: Optional[object]  # its ops.small_route
    buffers: tuple  # (index, shift, scale, weight, inv_ptr, inv_k): the buffers it was built from


class PlannedModule(CategoryErrors, nn.Module):
    """A module holding a Plan: the index and statistics, validated once (arguments.prepare) and held as buffers
    (they move with .to()): a call checks only shapes, dtypes and devices, so it never synchronizes with the
    GPU and compiles with torch.compile(fullgraph=True) or is captured in a CUDA graph. Statistics are held
    in float32 (the compute dtype of every Triton path), also under .half() / .to(dtype)."""

    _TAKES = MODULE_TAKES  # every keyword the constructor takes (its unknown-option error lists them)

    def __init__(self, index, mean=None, std=None, *, num_features: Optional[int] = None, categories=None,
                 decoder_categories=None, _loss_form=None, _decoder_gap=None, **options):
        # _loss_form: MaskedMSELoss's LossForm (reduction, gap, weight); a cleaner has none (those names stay
        # options there, which are refused as unknown). _decoder_gap: the decoder's Gap when not the plan's
        # (a cleaner's recon_loss).
        refuse_unknown(options, self._TAKES, type(self).__name__)
        refuse_spec(index, "index", f"{type(self).__name__}.from_spec(spec)")
        super().__init__()
        form = _loss_form or LossForm()
        weight = form.weight  # (checked below, with the categories a weight may name)
        plan = prepare(index, mean, std, options, num_features=num_features, form=form._replace(weight=None))
        self.categories = check_categories(categories, plan.columns.index.shape[0])
        plan = plan._replace(weight=module_weight(weight, self.categories, plan.columns.index.shape[0],
                                                  plan.columns.index.device, plan.gap.width))
        for name, value in (*plan.columns._asdict().items(), ("shift", plan.shift), ("scale", plan.scale),
                            ("weight", plan.weight)):
            self.register_buffer(name, value, persistent=False)
        self.plan = plan  # (its tensors are the buffers' at construction; a call reads the buffers)
        self._set_categories(decoder_categories, (plan.gap if _decoder_gap is None else _decoder_gap).width)
        self.hold()  # (built here and by .to(): a first call under torch.compile must find it, not change it)
        if _loss_form is None or plan.gap == (0, 0):  # the plan of its functional form too (masked_mse: no gap)
            _cache_as_functional(plan, (index, mean, std, weight)[: 4 if _loss_form else 3], options, _loss_form)

    def hold(self) -> "HeldPlan":
        """The HeldPlan of the buffers as they are now, kept (ops.held_plan calls this when they changed)."""
        b = self._buffers
        plan = self.plan._replace(columns=ColumnMap(b["index"], b["inv_ptr"], b["inv_k"]), shift=b["shift"],
                                  scale=b["scale"], weight=b["weight"])
        buffers = (b["index"], b["shift"], b["scale"], b["weight"], b["inv_ptr"], b["inv_k"])
        held = HeldPlan(plan, ops.small_route(plan), buffers)
        object.__setattr__(self, "_held", held)  # (no submodule, parameter or buffer: nn.Module's checks skipped)
        return held

    def _loss_weight(self) -> Optional[torch.Tensor]:
        """The per-kept-column weights [K] the loss uses now (the weight buffer; a hybrid objective's [K + c]
        weights without their embedding columns), for feature_category_errors."""
        return kept_weight(self.weight, self.num_kept, self.plan.gap)

    def _objective_weight(self) -> Optional[torch.Tensor]:
        """The weights the loss uses now, as given ([K], or [K + c] per decoder column), for category_errors."""
        return self.weight

    @classmethod
    def from_checkpoint(cls, path, *, norm: str = "stats", num_features: Optional[int] = None, trust: bool = False,
                        stats=None, **options):
        """The module a VQ-VAE checkpoint (file or folder) describes: its mask, and its statistics for
        norm="stats"; see fusedvq.load_feature_spec (num_features, trust, stats). options as in the
        constructor."""
        return cls.from_spec(load_spec(cls, path, norm, num_features, trust, stats), norm=norm, **options)

    @classmethod
    def from_spec(cls, spec: FeatureSpec, *, norm: str = "stats", **options):
        """The module for a FeatureSpec (fusedvq.load_feature_spec): its mask, and its statistics for
        norm="stats"."""
        check_spec(cls, spec)
        if spec.hybrid is not None and issubclass(cls, MaskedMSELoss) and "target_gap" in options:
            # (a loss given the decoder's whole output: its category errors are in decoder columns)
            options.setdefault("decoder_categories", spec.decoder_categories or None)
        module = cls(spec.feature_mask, **spec.stats_arguments(norm), norm=norm, categories=spec.categories, **options)
        module.hybrid = spec.hybrid  # (a hybrid VQ-VAE's layout: its decoder's output is wider than K)
        return module

    def _apply(self, fn, recurse=True):
        # .to(device) moves the statistics; .half() / .to(dtype) on an enclosing model must not round μ, 1/σ
        # and the weights to 16 bits (the result would be wrong for every input dtype), so they keep float32.
        kept = {name: getattr(self, name) for name in ("shift", "scale", "weight")
                if getattr(self, name, None) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        self.hold()
        return self

    norm = property(lambda self: NORMS[self.plan.norm])
    reduction = property(lambda self: REDUCTIONS[self.plan.reduction])
    eps = property(lambda self: self.plan.eps)
    nan_to_num = property(lambda self: self.plan.nan_to_num)
    backend = property(lambda self: self.plan.backend)
    target_gap = property(lambda self: self.plan.gap)
    sync_stats = property(lambda self: self.plan.sync[0])
    process_group = property(lambda self: self.plan.sync[1])
    num_features = property(lambda self: self.inv_ptr.shape[0] - 1, doc="D, the features' width")
    num_kept = property(lambda self: self.index.shape[0], doc="K, the kept columns")

    def extra_repr(self) -> str:
        synced = ", sync_stats=True" if self.plan.sync[0] or self.plan.sync[1] is not None else ""
        return (f"kept={self.num_kept} of {self.num_features} feature columns, norm={self.norm!r}{synced}, "
                f"nan_to_num={self.nan_to_num}, backend={self.backend!r}")


class MaskedMSELoss(PlannedModule):
    """masked_mse with the index and statistics prepared once and held as buffers (PlannedModule).

    Args:
        index: bool mask [D] or integer column indices [K] (then pass num_features=D).
        mean, std: μ, σ of length D or K (see masked_mse); required for norm="stats".
        num_features: D; needed with integer indices, checked against the mask's length otherwise.
        reduction, weight, and the options norm, eps, nan_to_num, backend, stats_space, sync_stats,
            process_group: as in masked_mse (norm="batch" takes no mean/std; sync_stats pools its statistics
            across ranks; with it the column errors are this rank's rows', as the loss is). weight may also
            name categories ({name: w}, the others 1) or be "balanced" (every category the same total weight).
        categories: {name: kept-column indices} (from_checkpoint / from_spec: the VQ-VAE's, in its order):
            category_errors(column_errors) gives the per-category errors of a reduction="column" loss.
        decoder_categories: with a target_gap (at, c), the same categories in the decoder's K + c columns (a
            hybrid's model_config group_indices: the INITIAL category holds the c embedding columns), which
            category_errors averages over; feature_category_errors uses categories (categories.py).
        target_gap: (at, width): the target holds `width` more columns, from column `at` on, that the loss
            skips (a hybrid VQ-VAE decoder's embedding columns): target [B, K + width], read in place, its
            gradient zero there. VQReconLoss.from_checkpoint sets it from the checkpoint.
    """

    def __init__(self, index, mean=None, std=None, *, reduction: str = "mean", target_gap=(0, 0), weight=None,
                 **options):
        super().__init__(index, mean, std, _loss_form=LossForm(reduction, target_gap, weight), **options)
        self.hybrid = None  # a hybrid VQ-VAE's layout, when built from its checkpoint

    def forward(self, features: torch.Tensor, target: torch.Tensor, embeddings: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """The loss of features [B, D] against target [B, K] ([B, K + c] with target_gap=(at, c)). embeddings
        [B, c] (with a target_gap): the hybrid's objective instead, one MSE over all K + c target columns,
        F.mse_loss(target, [z[:, :p], embeddings, z[:, p:]]) read in place; its reductions "none" and
        "column" give [B, K + c] and [K + c], a weight then has K + c entries, and gradients flow to the
        embeddings too (when they require one)."""
        if (self.hybrid is not None and not self.target_gap.width and isinstance(target, torch.Tensor)
                and target.dim() == 2 and target.shape[1] != self.num_kept):  # (the decoder's whole output?)
            ops.checks.decoder_output(target, self.num_kept, self.hybrid)
        held = ops.held_plan(self)
        return ops.call_loss(features, target, held.plan, _SIGNATURE, held.route, embeddings)

    def extra_repr(self) -> str:
        gap = f", target_gap={tuple(self.target_gap)}" if self.target_gap.width else ""
        return super().extra_repr() + f", reduction={self.reduction!r}{gap}"


__all__ = ["masked_mse", "MaskedMSELoss", "PlannedModule"]
