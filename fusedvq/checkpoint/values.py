"""Checkpoint values → arrays, leniently and within bounds: the mask, the decoder's width, the categories
and the per-category statistics, each parser raising _Problem (a sentence for Declared.problems) for what
it cannot read, and never letting a small file expand into a huge array; statistics from a
normalization_stats .npz, placed on the kept columns (assemble_stats) and described in words. declared.py
uses them."""

from __future__ import annotations

import zipfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .archives import STATS_MEMBERS, directory_problem, zip_directory
from .errors import MAX_NAME, _Problem, listed, quoted
from .reading import read_stats_file
from .records import ForeignObject

# (center, scale) key pairs by normalization method.
STATS_KEYS = {"standard": ("mean", "std"), "mad": ("median", "mad")}


@dataclass
class CategoryStats:
    """One category's (center, scale): mean/std or median/mad, each [n] float64."""

    center: np.ndarray
    scale: np.ndarray
    center_name: str = "mean"
    scale_name: str = "std"


# A mask, a category's indices or its statistics hold one entry per column: nested lists of more entries
# than this are refused before numpy expands them (pickle's memo lets a 2.5 KB file hold a list that
# references one inner list 10^9 times).
MAX_LIST_ENTRIES = 1 << 22


# What all the values read from one file may expand to, in entries: a view whose strides repeat memory (stride
# 0) declares entries the file does not hold, so a few bytes can stand for millions; each value is counted
# against the reading's budget before it is materialized (entry_budget: set by declare for one file).
_BUDGET: ContextVar[Optional[list]] = ContextVar("fusedvq_entry_budget", default=None)


@contextmanager
def entry_budget(file_size: int):
    """While open, the values parsed here may hold MAX_LIST_ENTRIES + file_size entries in all (an honest
    file stores each entry in at least a byte)."""
    token = _BUDGET.set([MAX_LIST_ENTRIES + file_size, 0])
    try:
        yield
    finally:
        _BUDGET.reset(token)


def _spend(entries: int, what: str) -> None:
    budget = _BUDGET.get()
    if budget is None:
        return
    limit, used = budget
    if used + entries > limit:
        raise _Problem(f"{what} has {entries:,} entries, and with the {used:,} read before that is more than the "
                       f"{limit:,} entries a file of its size can hold (it repeats memory through a view); not read")
    budget[1] = used + entries


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
    entries = 1
    if isinstance(value, (list, tuple)):
        try:
            entries = _list_entries(value, MAX_LIST_ENTRIES)
        except RecursionError:
            raise _Problem(f"{what} is a list nested too deeply to be an array of numbers") from None
        if entries > MAX_LIST_ENTRIES:
            raise _Problem(f"{what} is a nested list of more than {MAX_LIST_ENTRIES:,} entries, not one entry per "
                           f"column")
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        # An array or tensor whose strides repeat memory (stride 0) can declare far more entries than the file
        # holds: sized before anything is converted.
        entries = int(torch.Tensor.numel(value) if isinstance(value, torch.Tensor) else value.size)
        if entries > MAX_LIST_ENTRIES:
            raise _Problem(f"{what} has {entries:,} entries, more than the {MAX_LIST_ENTRIES:,} one entry per column "
                           f"could need")
    _spend(entries, what)
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
        shown = repr(value) if isinstance(value, (int, float, str, np.number)) and len(repr(value)) < 40 \
            else f"a {type(value).__name__}"
        raise _Problem(f"model_config['input_dim'] is {shown}, not a positive integer (the decoder's width)")
    return int(value)


def category_name(name: Any, where: str) -> str:
    """A category's name: a string (anything else, e.g. a tuple that memo references make exponentially
    large, is refused without being turned into text)."""
    if not isinstance(name, str):
        raise _Problem(f"{where} names a category by a {type(name).__name__}, not a string")
    return name


def _parse_categories(value: Any) -> dict[str, np.ndarray]:
    if not isinstance(value, Mapping):
        raise _Problem(
            f"group_indices must map category names to lists of column indices, got a {type(value).__name__}"
        )
    groups = {}
    for name, indices in value.items():
        name = category_name(name, "group_indices")
        array = _to_numpy(indices, f"group_indices[{quoted(name)}]").reshape(-1)
        if array.size and array.dtype.kind not in "iu":
            raise _Problem(f"category {quoted(name)} lists non-integer column indices ({array.dtype}, e.g. "
                           f"{array[0]!r:.40})")
        groups[name] = array.astype(np.int64)
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
    keys = listed(entry, 8) if len(entry) else "none"
    raise _Problem(f"{what} have neither mean/std nor median/mad (keys: {keys})")


def _parse_stats(value: Any, source: str, method: Optional[str]) -> dict[str, CategoryStats]:
    """{category: CategoryStats} from in-file normalization_stats or a parsed .npz."""
    if not isinstance(value, Mapping):
        raise _Problem(f"{source} must map categories to statistics, got a {type(value).__name__}")
    flat_keys = {k for pair in STATS_KEYS.values() for k in pair}
    if value and set(value) <= flat_keys and not any(isinstance(v, Mapping) for v in value.values()):
        # {"mean": [...], "std": [...]}: one set of statistics over all (kept or original) columns.
        return {"": _pick_pair(value, f"the statistics in {source}", method)}
    out = {}
    for name, entry in value.items():
        name = category_name(name, source)
        what = f"the statistics for category {quoted(name)} in {source}"
        if isinstance(entry, ForeignObject):  # e.g. NormalizationStats, read as a record of its state
            entry = entry.attributes
        elif not isinstance(entry, Mapping):  # the real object, loaded with trust=True
            entry = {k: getattr(entry, k) for k in flat_keys if hasattr(entry, k)} or entry
        if not isinstance(entry, Mapping):
            raise _Problem(f"{what} are a {type(entry).__name__}, not a mapping with mean/std or median/mad")
        out[name] = _pick_pair(entry, what, method)
    return out


def _method_of(stats: dict[str, CategoryStats], declared: Optional[str]) -> Optional[str]:
    """"standard" or "mad" from the keys actually used; the declared method only when they are mixed."""
    names = {s.center_name for s in stats.values()}
    return "mad" if names == {"median"} else "standard" if names == {"mean"} else declared


# ---------------------------------------------------------------------------------------------------
# Statistics files, and statistics placed on the kept columns
# ---------------------------------------------------------------------------------------------------


def _read_npz_stats(path: Path, where: str) -> tuple[dict[str, CategoryStats], Optional[str]]:
    budget = _BUDGET.get()
    if budget is not None:  # its arrays are the file's own bytes: the budget grows by them
        budget[0] += path.stat().st_size
    raw, method = read_stats_file(path)
    if not raw:
        raise _Problem(f"{path.name} holds no statistics: {_arrays_named(path)}")
    return _parse_stats(raw, where, method), method


def _arrays_named(path: Path, shown: int = 3) -> str:
    """What an .npz holds instead of statistics, in a few words (its array names, shortened, escaped)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[: -len(".npy")] if n.endswith(".npy") else n for n in archive.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError):
        names = []
    rule = "{category}_mean / _std (or _median / _mad), or mean / std over all columns"
    if not names:
        return f"it is an empty archive; statistics arrays are named {rule}"
    listed = ", ".join(repr(n if len(n) <= 40 else n[:37] + "...") for n in names[:shown])
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return f"none of its arrays ({listed}{more}) is named {rule}"


def is_stats_file(path: Path) -> bool:
    """An .npz of arrays (what np.savez writes: a zip of .npy members), not a torch checkpoint."""
    if path.suffix == ".npz":
        return True
    if zip_directory(path) is None or directory_problem(path, STATS_MEMBERS) is not None:
        return False  # (not parsed here: a checkpoint's directory is parsed in the bounded child)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def describe_stats(stats: dict[str, CategoryStats], method: Optional[str]) -> str:
    """"per-category mean/std (method standard): 8 categories, 171 columns (cluster_1: 12, ...)"."""
    pair = {"standard": "mean/std", "mad": "median/mad"}.get(method or "", "statistics")
    sizes = {name: s.center.size for name, s in stats.items()}
    if "" in stats:
        return f"{pair} over all columns ({sizes['']} columns, method {method or 'not declared'})"
    shown = ", ".join(f"{quoted(name)[1:-1] if len(name) <= MAX_NAME else quoted(name)}: {n}"
                      for name, n in list(sizes.items())[:6]) + (", ..." if len(sizes) > 6 else "")
    return (f"per-category {pair} (method {method or 'not declared'}): {len(sizes)} categories, "
            f"{sum(sizes.values())} columns ({shown})")


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
