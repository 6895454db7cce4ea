"""VQ-VAE checkpoints → the loss: safe loading, what the checkpoint declares, and what does not fit.

A checkpoint written by a VQ-VAE trainer is a torch `.pt` dict:

    feature_mask         bool [D0]: which of the D0 original feature columns survived cleaning (K kept)
    model_config         {"input_dim": K (the decoder's width),
                          "group_indices": {category: [kept-column indices in [0, K)]}, ...}
    normalization_stats  optional {category: {"mean", "std"} or {"median", "mad"}}, one entry per column
                         of the category, in the order of its group_indices
    feature_names, config, model_state_dict, ...   (read but not needed)

and often a `normalization_stats.npz` beside it with `{category}_mean` / `{category}_std` (or `_median` /
`_mad`) arrays and `_normalization_method` ("standard" or "mad"). Per-category statistics are scattered
through group_indices into one masked-space μ [K], σ [K]; median/MAD is the same affine map
z = (x − median)/mad, so it is used exactly like mean/std.

Safety: files are read with `torch.load(weights_only=True)` plus an allow-list of the numpy types such
files contain (arrays, scalars, dtypes). Anything else pickled (a class, a function call) is refused with
a message naming it, before any of it runs; `trust=True` loads it with full unpickling and warns.
`.npz` files are read with `allow_pickle=False`.

Layers: read (file → dict, never runs code by default) → declare (dict → Declared, lenient, records
what it cannot read) → diagnose (Declared → one sentence per problem, naming the numbers) → FeatureSpec
(only when there are no problems), from which the losses build themselves (module.py): nothing here
imports loss code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .safe_load import (  # the readers are re-exported as part of this module's API
    CheckpointError,
    PathLike,
    UnsafeLoadWarning,
    _not_regular,
    _Problem,
    read_checkpoint,
    read_stats_file,
    resolve_checkpoint,
)

STATS_FILE = "normalization_stats.npz"
# (center, scale) key pairs by normalization method.
STATS_KEYS = {"standard": ("mean", "std"), "mad": ("median", "mad")}


# ---------------------------------------------------------------------------------------------------
# What the checkpoint declares (lenient: unreadable pieces become problems, not exceptions)
# ---------------------------------------------------------------------------------------------------


@dataclass
class CategoryStats:
    """One category's (center, scale): mean/std or median/mad, each [n] float64."""

    center: np.ndarray
    scale: np.ndarray
    center_name: str = "mean"
    scale_name: str = "std"


@dataclass
class Declared:
    """What a checkpoint says, read leniently; None where a piece is missing or unreadable."""

    path: Path
    feature_mask: Optional[np.ndarray] = None  # [D0] bool
    input_dim: Optional[int] = None  # K, the decoder's width
    categories: Optional[dict[str, np.ndarray]] = None  # category → int64 kept-column indices
    stats: Optional[dict[str, CategoryStats]] = None  # category ("" = all columns) → stats
    method: Optional[str] = None  # "standard" | "mad"
    stats_source: Optional[str] = None  # where the stats came from, in words
    other_stats: Optional[dict[str, CategoryStats]] = None  # the stats file beside, when both exist
    other_source: Optional[str] = None
    feature_names: Optional[list] = None
    problems: list[str] = field(default_factory=list)  # pieces that could not be read

    @property
    def num_kept(self) -> Optional[int]:
        return int(self.feature_mask.sum()) if self.feature_mask is not None else None


# A mask, a category's indices or its statistics hold one entry per column: nested lists of more entries
# than this are refused before numpy expands them (pickle's memo lets a 2.5 KB file hold a list that
# references one inner list 10^9 times).
MAX_LIST_ENTRIES = 1 << 22


def _list_entries(value: Any, limit: int, sizes: Optional[dict] = None) -> int:
    """Leaf entries of nested lists/tuples, each distinct list sized once (shared ones are not walked
    again), stopping early once past `limit`."""
    sizes = {} if sizes is None else sizes
    key = id(value)
    if key in sizes:
        return sizes[key]
    total = 0
    for item in value:
        total += _list_entries(item, limit, sizes) if isinstance(item, (list, tuple)) else 1
        if total > limit:
            break
    sizes[key] = total
    return total


def _to_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (list, tuple)) and _list_entries(value, MAX_LIST_ENTRIES) > MAX_LIST_ENTRIES:
        raise _Problem(f"{what} is a nested list of more than {MAX_LIST_ENTRIES:,} entries, not one entry per column")
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return (value.double() if value.is_floating_point() else value).numpy()
        array = np.asarray(value)
    except Exception:
        raise _Problem(f"{what} is a {type(value).__name__}, not an array") from None
    if array.dtype == object:
        raise _Problem(f"{what} is a {type(value).__name__}, not an array of numbers")
    return array


def _numbers(value: Any, what: str) -> np.ndarray:
    """A 1-D float64 array (a scalar becomes one entry), or a problem naming what is wrong."""
    array = _to_numpy(value, what)
    if array.ndim > 1:
        raise _Problem(f"{what} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise _Problem(f"{what} must hold real numbers, got {array.dtype}")
    return array.astype(np.float64).reshape(-1)


def _parse_mask(value: Any) -> np.ndarray:
    mask = _to_numpy(value, "feature_mask")
    if mask.ndim != 1:
        raise _Problem(f"feature_mask must be 1-D (one entry per original feature column), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        # 0/1 integer masks (e.g. saved as uint8) are masks too; anything else is not.
        if mask.dtype.kind in "iu" and np.isin(mask, (0, 1)).all():
            return mask.astype(bool)
        raise _Problem(
            f"feature_mask must be a boolean array over the original feature columns, got {mask.dtype} values"
        )
    return mask


def _parse_input_dim(value: Any) -> int:
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()  # a number saved as a 0-d tensor or array
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise _Problem(f"model_config['input_dim'] is {value!r}, not a positive integer (the decoder's width)")
    return int(value)


def _parse_categories(value: Any) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise _Problem(
            f"group_indices must map category names to lists of column indices, got a {type(value).__name__}"
        )
    groups = {}
    for name, indices in value.items():
        array = _to_numpy(indices, f"group_indices[{name!r}]").reshape(-1)
        if array.size and array.dtype.kind not in "iu":
            raise _Problem(f"category {name!r} lists non-integer column indices ({array.dtype}, e.g. {array[0]!r})")
        groups[str(name)] = array.astype(np.int64)
    return groups


def _pick_pair(entry: Mapping, what: str, method: Optional[str]) -> CategoryStats:
    """(center, scale) from a {"mean","std"} / {"median","mad"} mapping, preferring the declared method."""
    order = [STATS_KEYS[method]] if method in STATS_KEYS else []
    order += [pair for pair in STATS_KEYS.values() if pair not in order]
    for center_key, scale_key in order:
        has_c, has_s = center_key in entry, scale_key in entry
        if has_c and has_s:
            center = _numbers(entry[center_key], f"{center_key} in {what}")
            scale = _numbers(entry[scale_key], f"{scale_key} in {what}")
            return CategoryStats(center, scale, center_key, scale_key)
        if has_c != has_s:
            missing, present = (scale_key, center_key) if has_c else (center_key, scale_key)
            raise _Problem(f"{what} have {present} but no {missing}")
    raise _Problem(f"{what} have neither mean/std nor median/mad (keys: {', '.join(map(str, entry)) or 'none'})")


def _parse_stats(value: Any, source: str, method: Optional[str]) -> dict[str, CategoryStats]:
    """{category: CategoryStats} from in-file normalization_stats or a parsed .npz."""
    if not isinstance(value, Mapping):
        raise _Problem(f"{source} must map categories to statistics, got a {type(value).__name__}")
    flat_keys = {k for pair in STATS_KEYS.values() for k in pair}
    if value and set(map(str, value)) <= flat_keys and not any(isinstance(v, Mapping) for v in value.values()):
        # {"mean": [...], "std": [...]}: one set of statistics over all (kept or original) columns.
        return {"": _pick_pair(value, f"the statistics in {source}", method)}
    out = {}
    for name, entry in value.items():
        what = f"the statistics for category {str(name)!r} in {source}"
        if not isinstance(entry, Mapping):
            # A trusted NormalizationStats-like object with attributes.
            entry = {k: getattr(entry, k) for k in flat_keys if hasattr(entry, k)} or entry
        if not isinstance(entry, Mapping):
            raise _Problem(f"{what} are a {type(entry).__name__}, not a mapping with mean/std or median/mad")
        out[str(name)] = _pick_pair(entry, what, method)
    return out


def _method_of(stats: dict[str, CategoryStats], declared: Optional[str]) -> Optional[str]:
    """"standard" or "mad" from the keys actually used; the declared method only when they are mixed."""
    names = {s.center_name for s in stats.values()}
    return "mad" if names == {"median"} else "standard" if names == {"mean"} else declared


def _stats_files(file: Path) -> list[Path]:
    """Candidate normalization_stats*.npz files beside the checkpoint (its folder, then the run folder)."""
    for folder in (file.parent, file.parent.parent):
        exact = folder / STATS_FILE
        if exact.is_file():
            return [exact]
    return sorted(p for p in file.parent.glob("normalization_stats*.npz") if p.is_file())  # no FIFOs


def declare(path: PathLike, *, trust: bool = False, stats: Optional[PathLike] = None,
            need_stats: bool = True) -> Declared:
    """Everything the checkpoint declares, with the pieces that could not be read as problems.

    stats: None (the checkpoint's own normalization_stats, else a normalization_stats.npz beside it),
    "checkpoint" (only the checkpoint's own), or the path of an .npz to use instead. Never raises for a
    bad file; a file that cannot be read at all gives a Declared with one problem.
    """
    decl = Declared(path=Path(path))
    try:
        decl.path = resolve_checkpoint(path)
        data = read_checkpoint(decl.path, trust=trust)
    except CheckpointError as err:
        decl.problems += err.problems
        return decl

    def attempt(fn, *args):
        try:
            return fn(*args)
        except _Problem as p:
            decl.problems.append(str(p))
            return None

    if "feature_mask" in data and data["feature_mask"] is not None:
        decl.feature_mask = attempt(_parse_mask, data["feature_mask"])
    else:
        decl.problems.append(
            "the checkpoint has no feature_mask, so it does not say which of the extractor's feature columns "
            "the decoder reconstructs"
        )
    config = data.get("model_config")
    if not isinstance(config, Mapping):
        what = "no model_config" if config is None else f"a model_config that is a {type(config).__name__}"
        decl.problems.append(f"the checkpoint has {what}, so the decoder's input_dim is unknown")
        config = {}
    elif "input_dim" not in config:
        decl.problems.append("model_config has no input_dim, so the decoder's width is unknown")
    if "input_dim" in config:
        decl.input_dim = attempt(_parse_input_dim, config["input_dim"])
    # Older trainers put group_indices at the top level; model_config's copy is the decoder's own.
    groups = config.get("group_indices", data.get("group_indices"))
    if groups is not None:
        decl.categories = attempt(_parse_categories, groups)
    elif need_stats:
        decl.problems.append(
            "the checkpoint has no group_indices (in model_config), so per-category normalization "
            "statistics cannot be placed on the kept columns"
        )
    names = data.get("feature_names")
    decl.feature_names = list(names) if isinstance(names, (list, tuple)) else None
    if need_stats:
        _declare_stats(decl, data, stats, attempt)
    return decl


def _read_npz_stats(path: Path, where: str) -> tuple[dict[str, CategoryStats], Optional[str]]:
    raw, method = read_stats_file(path)
    return _parse_stats(raw, where, method), method


def _declare_stats(decl: Declared, data: dict, stats: Optional[PathLike], attempt) -> None:
    """Fill decl.stats, from the checkpoint itself first, else from the .npz beside it (or `stats`).

    When both exist, the .npz goes to decl.other_stats so the diagnosis can check that they agree.
    """
    only_file = stats is not None and str(stats) == "checkpoint"
    in_file = beside = None
    if (stats is None or only_file) and data.get("normalization_stats") is not None:
        in_file = attempt(_parse_stats, data["normalization_stats"], "the checkpoint's normalization_stats", None)
        if in_file is None:
            return  # the problem is recorded
    if not only_file:
        if stats is not None:
            npz_paths, where = [Path(stats)], Path(stats).name
            if not npz_paths[0].is_file():
                why = _not_regular(npz_paths[0]) if npz_paths[0].exists() else None
                decl.problems.append(f"the statistics file {stats} cannot be read: {why}" if why
                                     else f"no normalization statistics file at {stats}")
                return
        else:
            npz_paths = _stats_files(decl.path)
            where = ""
            if npz_paths:
                same_folder = npz_paths[0].parent == decl.path.parent
                where = f"{npz_paths[0].name} {'beside the checkpoint' if same_folder else 'in the folder above it'}"
        if len(npz_paths) > 1:
            if in_file is None:
                names = ", ".join(p.name for p in npz_paths)
                decl.problems.append(
                    f"{len(npz_paths)} statistics files lie beside the checkpoint ({names}) and it holds none "
                    f"itself: pass the one to use (stats=... / --stats)"
                )
                return
            npz_paths = []  # the checkpoint's own statistics decide; nothing unambiguous to compare
        if npz_paths:
            beside = attempt(_read_npz_stats, npz_paths[0], where)
            if beside is None:
                return  # the problem is recorded
    if in_file is not None:
        decl.stats, decl.stats_source = in_file, "the checkpoint's normalization_stats"
        decl.method = _method_of(in_file, None)
        if beside is not None:
            decl.other_stats, decl.other_source = beside[0], where
    elif beside is not None:
        decl.stats, decl.stats_source = beside[0], where
        decl.method = _method_of(beside[0], beside[1])
    elif only_file:
        decl.problems.append("no normalization statistics: the checkpoint holds no normalization_stats")
    else:
        decl.problems.append(
            f"no normalization statistics: the checkpoint holds no normalization_stats and no {STATS_FILE} "
            f"lies beside it in {decl.path.parent}"
        )


# ---------------------------------------------------------------------------------------------------
# Diagnosis: one sentence per problem, naming the numbers
# ---------------------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _first(values, n: int = 5) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:n])) + (", ..." if len(values) > n else "")


def find_problems(decl: Declared, num_features: Optional[int] = None, *, need_stats: bool = True) -> list[str]:
    """Everything that does not fit, as sentences: the reading problems, then the consistency ones.

    num_features: the extractor's width D (what the features tensor will have), checked against the
    mask's length. need_stats=False skips group_indices and statistics (norm="none" / "batch").
    """
    problems = list(decl.problems)
    mask = decl.feature_mask
    if mask is not None:
        kept = int(mask.sum())
        if num_features is not None and mask.shape[0] != num_features:
            problems.append(
                f"feature_mask has {mask.shape[0]} entries (the original feature width) but the extractor gives "
                f"{num_features} columns: the VQ-VAE's mask was made for {mask.shape[0]}-column features"
            )
        if kept == 0:
            problems.append(f"feature_mask keeps none of its {mask.shape[0]} columns")
        elif decl.input_dim is not None and kept != decl.input_dim:
            problems.append(
                f"feature_mask keeps {kept} of {mask.shape[0]} columns but the decoder's input_dim is "
                f"{decl.input_dim}: the decoder would reconstruct {decl.input_dim} columns, not {kept}"
            )
    if not need_stats:
        return problems
    # Kept-column space: the decoder's width when declared, else what the mask keeps.
    K = decl.input_dim if decl.input_dim is not None else (int(mask.sum()) if mask is not None else None)
    if decl.categories is not None and K is not None:
        problems += _group_problems(decl.categories, K)
    if decl.stats is not None:
        problems += _stats_problems(decl.stats, decl.categories, decl.stats_source, K, mask)
        if decl.other_stats is not None and not problems:
            problems += _agreement_problems(decl)
    return problems


def _group_problems(groups: dict[str, np.ndarray], K: int) -> list[str]:
    """Out-of-range, repeated, overlapping and missing kept columns of the categories. Work and memory grow
    with the indices listed, never with K (a checkpoint may declare any input_dim)."""
    problems = []
    names = list(groups)
    claims = []  # (kept column, category) for every in-range column of every category, once per category
    for g, (name, idx) in enumerate(groups.items()):
        bad = (idx < 0) | (idx >= K)
        if bad.any():
            problems.append(
                f"category {name!r} has column index {int(idx[bad][0])}, outside the {K} kept columns "
                f"(valid: 0..{K - 1}); {int(bad.sum())} of its {idx.size} indices out of range"
            )
        uniq, counts = np.unique(idx[~bad], return_counts=True)
        if (counts > 1).any():
            problems.append(
                f"category {name!r} lists {_count(int((counts > 1).sum()), 'kept column')} more than once "
                f"(first: {int(uniq[counts > 1][0])})"
            )
        claims.append(np.stack([uniq, np.full(uniq.size, g, dtype=np.int64)], axis=1))
    claimed = np.concatenate(claims) if claims else np.zeros((0, 2), dtype=np.int64)
    claimed = claimed[np.lexsort((claimed[:, 1], claimed[:, 0]))]  # by column, then category
    later = np.flatnonzero(claimed[1:, 0] == claimed[:-1, 0]) + 1  # a column claimed again
    overlaps: dict[tuple[int, int], list[int]] = {}
    for row in later:
        col, g = int(claimed[row, 0]), int(claimed[row, 1])
        first = int(claimed[np.searchsorted(claimed[:, 0], col), 1])
        overlaps.setdefault((first, g), []).append(col)
    for (a, b), cols in list(overlaps.items())[:5]:
        problems.append(
            f"categories {names[a]!r} and {names[b]!r} overlap: both claim {_count(len(cols), 'kept column')} "
            f"(first: {cols[0]})"
        )
    if len(overlaps) > 5:
        problems.append(f"... and {len(overlaps) - 5} more overlapping pairs of categories")
    covered = np.unique(claimed[:, 0])
    missing = K - covered.size
    if missing:
        problems.append(
            f"the categories cover {covered.size} of the {K} kept columns; {_count(missing, 'column')} "
            f"{'is' if missing == 1 else 'are'} in no category (kept {_first(_first_missing(covered, K))})"
        )
    return problems


def _first_missing(covered: np.ndarray, K: int, n: int = 6) -> list[int]:
    """The first n columns of range(K) not in `covered` (sorted, unique), without building range(K)."""
    out, expect = [], 0
    for col in covered.tolist() + [K]:
        while expect < col and len(out) < n:
            out.append(expect)
            expect += 1
        if len(out) >= n:
            break
        expect = col + 1
    return out


def _stats_problems(stats: dict[str, CategoryStats], groups: Optional[dict[str, np.ndarray]], source: str,
                    K: Optional[int], mask: Optional[np.ndarray]) -> list[str]:
    problems = []
    if "" in stats:  # one set over all columns: length K (kept) or D0 (original)
        s = stats[""]
        widths = {K, mask.shape[0] if mask is not None else None} - {None}
        for name, arr in ((s.center_name, s.center), (s.scale_name, s.scale)):
            if widths and arr.size not in widths:
                problems.append(
                    f"{name} in {source} has {arr.size} entries but must have one per kept column ({K}) or per "
                    f"original column ({mask.shape[0] if mask is not None else '?'})"
                )
        return problems + _value_problems("", s, None, source)
    if groups is None:
        return problems
    for name in stats:
        if name not in groups:
            problems.append(
                f"{source} has statistics for category {name!r}, which group_indices does not declare "
                f"(declared: {', '.join(map(repr, list(groups)[:6]))}{', ...' if len(groups) > 6 else ''})"
            )
    for name, idx in groups.items():
        if name not in stats:
            problems.append(f"{source} has no statistics for category {name!r} ({idx.size} columns)")
            continue
        s = stats[name]
        sized = True
        for what, arr in ((s.center_name, s.center), (s.scale_name, s.scale)):
            if arr.size != idx.size:
                sized = False
                problems.append(
                    f"{what} for category {name!r} has {arr.size} entries but the category covers {idx.size} columns"
                )
        if sized:
            problems += _value_problems(name, s, idx if K is None or ((idx >= 0) & (idx < K)).all() else None, source)
    return problems


def _value_problems(name: str, s: CategoryStats, idx: Optional[np.ndarray], source: str) -> list[str]:
    """σ finite and > 0, μ finite; positions named by entry and kept column."""
    label = f"for category {name!r}" if name else f"in {source}"
    problems = []
    checks = (
        (s.scale_name, s.scale, ~(np.isfinite(s.scale) & (s.scale > 0)), "must be finite and > 0"),
        (s.center_name, s.center, ~np.isfinite(s.center), "must be finite"),
    )
    for what, arr, bad, rule in checks:
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            col = f" (kept column {int(idx[j])})" if idx is not None else ""
            problems.append(
                f"{what} {label} is {float(arr[j])} at entry {j}{col}; {what} {rule} "
                f"({int(bad.sum())} of {arr.size} entries bad)"
            )
    return problems


def _agreement_problems(decl: Declared) -> list[str]:
    """The checkpoint's own statistics and the .npz beside it must say the same thing."""
    K = decl.input_dim or decl.num_kept
    try:
        mine = assemble_stats(decl.stats, decl.categories, K, decl.feature_mask)
        theirs = assemble_stats(decl.other_stats, decl.categories, K, decl.feature_mask)
    except (ValueError, KeyError):
        return [
            f"{decl.stats_source} and {decl.other_source} hold statistics for different categories or "
            f"lengths: pass stats='checkpoint' or the .npz to choose one"
        ]
    for what, a, b in (("mean", mine[0], theirs[0]), ("std", mine[1], theirs[1])):
        close = np.isclose(a, b, rtol=1e-5, atol=1e-7)
        if not close.all():
            k = int(np.flatnonzero(~close)[0])
            return [
                f"{decl.stats_source} and {decl.other_source} disagree: {what} of kept column {k} is {a[k]:.6g} "
                f"vs {b[k]:.6g} ({int((~close).sum())} of {K} columns differ); pass stats='checkpoint' "
                f"(CLI: --stats checkpoint) or the .npz to choose one"
            ]
    return []


def diagnose(path: PathLike, num_features: Optional[int] = None, *, trust: bool = False,
             stats: Optional[PathLike] = None, need_stats: bool = True) -> list[str]:
    """One sentence per problem that keeps the checkpoint from fitting a num_features-wide extractor."""
    decl = declare(path, trust=trust, stats=stats, need_stats=need_stats)
    return find_problems(decl, num_features, need_stats=need_stats)


# ---------------------------------------------------------------------------------------------------
# The loader: a consistent checkpoint → mask, index, masked-space μ, σ → the loss
# ---------------------------------------------------------------------------------------------------


def assemble_stats(stats: dict[str, CategoryStats], categories: Optional[dict[str, np.ndarray]], num_kept: int,
                   feature_mask: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Masked-space (μ [K], σ [K]) float64 from per-category statistics placed through group_indices.

    Entry j of a category's arrays belongs to kept column categories[name][j]. Statistics over all
    columns (category "") of length D0 are gathered through the mask.
    """
    if "" in stats:
        s = stats[""]
        if s.center.size == num_kept:
            return s.center.copy(), s.scale.copy()
        if feature_mask is None or s.center.size != feature_mask.shape[0]:
            raise ValueError(f"statistics have {s.center.size} entries, neither K = {num_kept} nor the mask's length")
        return s.center[feature_mask].copy(), s.scale[feature_mask].copy()
    if categories is None:
        raise ValueError("per-category statistics need group_indices")
    mean = np.full(num_kept, np.nan)
    std = np.full(num_kept, np.nan)
    for name, idx in categories.items():
        mean[idx] = stats[name].center
        std[idx] = stats[name].scale
    return mean, std


@dataclass(frozen=True)
class FeatureSpec:
    """What the loss needs from a checkpoint, checked consistent.

    feature_mask [D] bool over the extractor's columns; index [K] int64 = the kept columns in order;
    mean, std [K] float64 in the masked space (the decoder's columns), or None when not loaded.
    """

    path: Path
    feature_mask: torch.Tensor  # [D] bool
    index: torch.Tensor  # [K] int64
    input_dim: int  # the decoder's width (== K)
    categories: dict[str, tuple[int, ...]]  # category → kept-column indices (empty when not declared)
    mean: Optional[torch.Tensor]  # [K] float64
    std: Optional[torch.Tensor]  # [K] float64
    method: Optional[str]  # "standard" (mean/std) | "mad" (median/mad) | None
    stats_source: Optional[str]
    feature_names: Optional[list] = None

    @property
    def num_features(self) -> int:
        """D, the width the extractor must give (the mask's length)."""
        return int(self.feature_mask.shape[0])

    @property
    def num_kept(self) -> int:
        """K, the decoder's width."""
        return int(self.index.shape[0])

    def stats_arguments(self, norm: str) -> dict:
        """The statistics a loss built from this spec takes: μ, σ in the masked space for norm="stats",
        none otherwise."""
        if norm != "stats":
            return {}
        if self.mean is None:
            raise ValueError(f'norm="stats" needs statistics, and this FeatureSpec ({self.path}) holds none')
        return dict(mean=self.mean, std=self.std, stats_space="masked")


def load_feature_spec(path: PathLike, *, num_features: Optional[int] = None, trust: bool = False,
                      stats: Optional[PathLike] = None, require_stats: bool = True) -> FeatureSpec:
    """Mask, index, D, K, decoder input_dim, categories and masked-space μ, σ from a checkpoint (file or folder).

    num_features: the extractor's width, checked against the mask. stats: see `declare`. require_stats=False
    reads neither group_indices nor statistics (for norm="none" / "batch"). Raises CheckpointError listing
    every problem (the same sentences `fusedvq check` prints).
    """
    decl = declare(path, trust=trust, stats=stats, need_stats=require_stats)
    problems = find_problems(decl, num_features, need_stats=require_stats)
    if problems:
        raise CheckpointError(problems, decl.path)
    mask = torch.from_numpy(decl.feature_mask.copy())
    mean = std = None
    if require_stats:
        mu, sigma = assemble_stats(decl.stats, decl.categories, decl.input_dim, decl.feature_mask)
        mean, std = torch.from_numpy(mu), torch.from_numpy(sigma)
    categories = {name: tuple(int(i) for i in idx) for name, idx in (decl.categories or {}).items()}
    return FeatureSpec(
        path=decl.path, feature_mask=mask, index=mask.nonzero().squeeze(1), input_dim=decl.input_dim,
        categories=categories, mean=mean, std=std, method=decl.method if require_stats else None,
        stats_source=decl.stats_source if require_stats else None, feature_names=decl.feature_names,
    )  # fmt: skip


__all__ = [
    "CheckpointError", "UnsafeLoadWarning", "FeatureSpec", "Declared", "CategoryStats", "resolve_checkpoint",
    "read_checkpoint", "read_stats_file", "declare", "find_problems", "diagnose", "assemble_stats",
    "load_feature_spec",
]
