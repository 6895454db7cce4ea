"""Arguments → one record: every option, index and statistic of a call validated in one pass, with errors
that name the numbers, shared by the functional forms (masked_mse, clean_features, partials_mse: once per
new set of arguments, the plan then cached) and the modules (MaskedMSELoss, FeatureCleaner, VQReconLoss:
once, at construction).

The record, Plan: the column map (kernels/plan.py's ColumnMap: index [K] int64 in [0, D) and its inverse),
shift = μ [K] and scale = 1/σ [K] (norm "stats"; else None), the norm and reduction codes, eps, nan_to_num,
the backend, the cross-rank options, the target's gap. The checks of a call's tensors against it (shapes,
dtypes, devices: free, no values read) are the routing point's (ops/__init__.py). Checks of values here
(index range, mask count, σ > 0) read the values on the host, so they run once per module and once per
functional call with new arguments in eager mode (skipped while torch.compile traces, where they would break
the graph). PLAN_CACHE holds the plans of recent functional calls, keyed (loss.py's plan_key) by their
arguments' identities and versions: a repeated call skips this file.
The kinds of the options (flags, counts, choices, keywords) and of the index are checked by strict.py, never
coerced.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

from .kernels.plan import NO_GAP, NORM_BATCH, NORM_STATS, ColumnMap, Gap
from .strict import as_tensor, check_count, check_eps, check_flag, check_gap, index_tensor, option_code, refuse_unknown
from .weights import check_weight

REDUCTIONS = ("none", "mean", "sum", "column")  # code = position (kernels/plan.py's REDUCTION_*)
NORMS = ("none", "stats", "batch")  # code = position (NORM_*)
BACKENDS = ("auto", "triton", "reference")
STATS_SPACES = ("raw", "masked")
# The keyword options of every form, and their defaults.
OPTIONS = {"norm": "stats", "eps": 1e-8, "nan_to_num": False, "backend": "auto", "stats_space": None,
           "sync_stats": False, "process_group": None}


class LossForm(NamedTuple):
    """What a loss compares and how it sums, besides the columns and statistics: its reduction, the target's
    gap (the caller's target_gap=(at, width): a hybrid decoder's embedding columns), and the loss's weights
    (check_weight's [K] or [K + width] numbers, or None). A cleaner's plan takes the defaults."""

    reduction: str = "mean"
    gap: tuple = NO_GAP
    weight: object = None


class Plan(NamedTuple):
    """A call's validated arguments (the module forms swap in their buffers' tensors per call)."""

    columns: ColumnMap
    shift: Optional[torch.Tensor]  # [K] μ in the compute dtype (float32 in modules), or None
    scale: Optional[torch.Tensor]  # [K] 1/σ, or None
    weight: Optional[torch.Tensor]  # [K] w ≥ 0 per kept column of the loss (float32 in modules), or None
    norm: int
    reduction: int
    eps: float
    nan_to_num: bool
    backend: str
    sync: tuple  # (sync_stats, process_group) of norm "batch"; (False, None) otherwise
    gap: Gap  # the target's skipped columns (kernels/plan.py); NO_GAP for a [B, K] target
    selector: str  # "mask" or "index", for messages


def prepare(index, mean=None, std=None, options: Optional[dict] = None, *, num_features: Optional[int],
            num_kept: Optional[int] = None, form: LossForm = LossForm(), dtype: torch.dtype = torch.float32,
            device: Optional[torch.device] = None) -> Plan:
    """The Plan of these arguments. options: the caller's keyword options, those of OPTIONS (other names are
    refused); num_features: D (None: the mask's length; integer indices then fail); num_kept: the target's
    width, when known (sizes a traced mask's gather statically); form: the loss's reduction, gap and weights;
    dtype: the compute dtype of the statistics and weights; device: the features' (the functional forms: the
    index and statistics move there), or None (a module: they stay where they are given)."""
    refuse_unknown(options or {}, tuple(OPTIONS), "the loss")  # (the public forms list their own first)
    if num_features is not None:
        num_features = check_count("num_features", num_features, minimum=1)
    o = {**OPTIONS, **(options or {})}
    reduction_id = option_code("reduction", form.reduction, REDUCTIONS)
    norm = option_code("norm", o["norm"], NORMS)
    eps, nan_to_num = check_eps(o["eps"]), check_flag("nan_to_num", o["nan_to_num"])
    option_code("backend", o["backend"], BACKENDS)
    sync = (check_flag("sync_stats", o["sync_stats"]), o["process_group"])
    if norm != NORM_BATCH and (sync[0] or sync[1] is not None):
        raise ValueError(f'sync_stats / process_group apply to norm="batch" only, not norm={o["norm"]!r}')
    module = device is None
    if module:
        device = index.device if isinstance(index, torch.Tensor) else torch.device("cpu")
    index_t = index_tensor(index, device, num_features)  # the one check of an index's kind
    if index_t.dtype == torch.bool:
        if module and num_features is not None and num_features != index_t.shape[0]:
            raise ValueError(f"feature_mask has {index_t.shape[0]} entries but num_features={num_features}: the "
                             f"mask needs one entry per feature column")
        num_features = index_t.shape[0] if num_features is None else num_features  # (a mismatch: canonical_index)
    elif num_features is None:
        raise ValueError("integer indices need num_features=D (the features' width) to be validated")
    idx, selector = canonical_index(index_t, num_features, num_kept)
    columns = build_column_map(idx, num_features)
    shift = scale = None
    if norm == NORM_STATS:
        shift, scale = canonical_stats(mean, std, idx, num_features, o["stats_space"], dtype, device)
    else:
        for name, value in (("mean", mean), ("std", std)):
            if value is not None:
                raise ValueError(f"{name} was given but norm={o['norm']!r} does not use it")
    K = columns.index.shape[0]
    gap = check_gap(form.gap, K)
    weight = None if form.weight is None else check_weight(form.weight, K, dtype, columns.index.device, gap.width)
    return Plan(columns, shift, scale, weight, norm, reduction_id, eps, nan_to_num, o["backend"], sync, gap,
                selector)


class CachedPlan(NamedTuple):
    """A functional call's Plan and small route, cached for later calls with the same arguments (loss.py's
    plan_key and cached_plan find it), with weak references to the index, statistics and weight it was built
    from (a hit needs those very objects alive: ids are reused after garbage collection) and their storages,
    held so that no other data takes their addresses (a .data swap keeps the version: the pointer tells)."""

    plan: Plan
    route: Optional[object]  # ops.small_route(plan)
    refs: tuple = ()  # weakref.ref of each tensor argument, None for None
    storages: tuple = ()


PLAN_CACHE: "OrderedDict[tuple, CachedPlan]" = OrderedDict()  # plan key → CachedPlan, the last used last
PLAN_CACHE_SIZE = 8
PLAN_CACHE_LOCK = threading.Lock()


def cache_plan(key: Optional[tuple], tensors: tuple, plan: Plan, small_route, copy: bool = False) -> CachedPlan:
    """plan with its route (small_route: ops.small_route), cached under key (the least recently used dropped past
    PLAN_CACHE_SIZE) unless key is None or inference mode is on (the plan's tensors are then inference tensors,
    which a later call's autograd could not save). tensors: the index, statistics and weight the key names.
    copy: cache copies of the plan's tensors (a module's plan: its buffers are the module's to write)."""
    if key is None or torch.is_inference_mode_enabled():
        return CachedPlan(plan, small_route(plan))
    if copy:
        copies = {n: getattr(plan, n).clone() for n in ("shift", "scale", "weight") if getattr(plan, n) is not None}
        plan = plan._replace(columns=ColumnMap(*(t.clone() for t in plan.columns)), **copies)
    cached = CachedPlan(plan, small_route(plan), tuple(t if t is None else weakref.ref(t) for t in tensors),
                        tuple(t.untyped_storage() for t in tensors if t is not None))
    with PLAN_CACHE_LOCK:
        PLAN_CACHE.pop(key, None)
        PLAN_CACHE[key] = cached
        while len(PLAN_CACHE) > PLAN_CACHE_SIZE:
            PLAN_CACHE.popitem(last=False)
    return cached


def swapped_widths(index, width: int, target_width: int) -> Optional[tuple[int, int]]:
    """masked_mse(recon, features, index), in F.mse_loss's habit: (D, K) when the widths are exactly the other
    way round (features as wide as the kept columns, target as wide as the mask, or for integer indices as wide
    as their largest), for ops.check_order to say so; else None. Looks at values only when an error is coming
    anyway (eager, not traced)."""
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or _is_tracing():
        return None
    n = index.shape[0]
    if index.dtype == torch.bool and width != n == target_width:
        return n, int(index.sum())
    if index.dtype in (torch.int32, torch.int64) and n == width < target_width:
        if not bool(((index >= 0) & (index < target_width)).all()) or int(index.max()) < width:
            return None  # indices that fit the features, or fit neither: not a swap
        return target_width, n
    return None

def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def canonical_index(index: torch.Tensor, num_features: int, num_kept: Optional[int] = None) -> tuple[torch.Tensor, str]:
    """(index [K] int64, "mask" or "index") from index_tensor's bool mask [D] or integer indices [K].

    num_kept (the target's width), when given, sizes the gather of a bool mask statically, so no
    data-dependent shape appears while torch.compile traces.
    """
    if index.dtype == torch.bool:
        if index.shape[0] != num_features:
            raise ValueError(
                f"feature_mask has {index.shape[0]} entries but features have {num_features} columns: "
                f"the mask needs one entry per feature column"
            )
        if not _is_tracing():
            kept = int(index.sum())
            if kept == 0:
                raise ValueError(f"feature_mask keeps none of the {num_features} feature columns")
            if num_kept is not None and kept != num_kept:
                raise ValueError(
                    f"target has {num_kept} columns but the mask keeps {kept} of the {num_features} feature "
                    f"columns — pass the decoder's {kept}-column reconstruction"
                )
            return index.nonzero().squeeze(1), "mask"
        if num_kept is None:
            return index.nonzero().squeeze(1), "mask"
        # Traced: the gather is sized by the target's width; a mask keeping another count fails on the
        # device (no host sync, nothing for the graph to break on) instead of padding with column -1.
        torch._assert_async(index.sum() == num_kept, "the mask keeps a different number of columns than target has")
        return torch.nonzero_static(index, size=num_kept, fill_value=-1).squeeze(1), "mask"
    index = index.long().contiguous()  # the kernels read index[k] at offset k
    if _is_tracing():
        # Traced, a host check would break the graph: an index outside [0, D) fails on the device instead
        # (the kernels never read out of bounds, but would drop that column).
        torch._assert_async(((index >= 0) & (index < num_features)).all(),
                            "index holds a value outside the feature columns [0, D)")
    else:
        bad = (index < 0) | (index >= num_features)
        if bool(bad.any()):
            first = int(index[bad][0])
            raise ValueError(
                f"index holds {first}, outside the {num_features} feature columns: values must be in "
                f"[0, {num_features - 1}] ({int(bad.sum())} of {index.shape[0]} are out of range)"
            )
    return index, "index"


def canonical_stats(mean, std, index: torch.Tensor, num_features: int, stats_space: Optional[str],
                    dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift = μ [K], scale = 1/σ [K]) in `dtype`, from μ, σ of length D (raw) or K (masked)."""
    if mean is None or std is None:
        missing = " and ".join(n for n, v in (("mean", mean), ("std", std)) if v is None)
        raise ValueError(f'norm="stats" needs mean and std; {missing} not given (or use norm="batch" / "none")')
    if stats_space is not None:
        option_code("stats_space", stats_space, STATS_SPACES)
    K, D = index.shape[0], num_features
    out = []
    for name, value in (("mean", mean), ("std", std)):
        t = as_tensor(value, name, device)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
        n = t.shape[0]
        space = stats_space
        # (Traced, a mask's K is a size known on the device only: statistics not of length D are taken to be
        # per kept column, and their length is checked on the device.)
        if space is None:
            if guard_or_false(D == K) and n == D:
                raise ValueError(
                    f"{name} has {n} entries and D == K == {n}, so it could be per feature column or per kept "
                    f"column: pass stats_space='raw' (length D, indexed by the mask) or 'masked' (length K)"
                )
            space = "raw" if n == D else "masked" if guard_or_true(n == K) else None
        expected = D if space == "raw" else K
        if space is None or guard_or_false(n != expected):
            raise ValueError(
                f"{name} has {n} entries but must have one per feature column (D = {D}) or one per kept column "
                f"(K = {K})" + (f"; stats_space={stats_space!r} expects {expected}" if stats_space else "")
            )
        torch._check(n == expected)  # (traced: checked on the device)
        t = t.to(torch.float64)
        out.append(t.index_select(0, index) if space == "raw" else t)
    mu, sigma = out
    if not _is_tracing():
        _check_stats_values(mu, sigma, index, dtype)
    return mu.to(dtype), sigma.reciprocal().to(dtype)


def _check_stats_values(mu: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> None:
    """μ finite, σ finite and > 0 in every kept column, and so are μ, σ and 1/σ as the kernels hold them
    (in the compute dtype: a float64 μ = 1e39 is inf in float32, σ = 1e-46 is 0, σ = 1e-39 has 1/σ = inf;
    each would give a wrong but finite-looking loss). One host synchronization for all of it."""
    mu_c, sigma_c = mu.to(dtype), sigma.to(dtype)
    bad = torch.stack([
        ~(torch.isfinite(sigma) & (sigma > 0)),
        ~torch.isfinite(mu),
        ~torch.isfinite(mu_c),
        ~(torch.isfinite(sigma_c) & (sigma_c > 0)),
        ~torch.isfinite(sigma_c.reciprocal()),
    ])  # [5, K]
    flags = bad.any(1).tolist()
    if not any(flags):
        return
    K = index.shape[0]
    which = flags.index(True)
    k = int(bad[which].nonzero()[0])
    where = f"kept column {k} (feature column {int(index[k])})"
    count = f"{int(bad[which].sum())} of {K} bad"
    name = str(dtype).replace("torch.", "")
    if which == 0:
        raise ValueError(f"std must be finite and > 0 in every kept column; {where} has std {float(sigma[k])} "
                         f"({count})")
    if which == 1:
        raise ValueError(f"mean must be finite in every kept column; {where} has mean {float(mu[k])}")
    what, value = {2: ("mean", mu), 3: ("std", sigma), 4: ("1/std", sigma)}[which]
    raise ValueError(
        f"{what} does not fit {name}, the dtype the loss computes in: {where} has "
        f"{'mean' if what == 'mean' else 'std'} {float(value[k])} ({count}); rescale the features and "
        f"statistics, or use float64 features (reference backend)"
    )


def build_column_map(index: torch.Tensor, num_features: int) -> ColumnMap:
    """The map of a 1-D int64 `index` [K] with values in [0, num_features)."""
    sorted_cols, order = torch.sort(index, stable=True)
    boundaries = torch.arange(num_features + 1, device=index.device, dtype=index.dtype)
    # inv_ptr[d] = number of kept columns reading a feature column < d.
    inv_ptr = torch.searchsorted(sorted_cols, boundaries, out_int32=True)
    return ColumnMap(index=index, inv_ptr=inv_ptr, inv_k=order.to(torch.int32))
