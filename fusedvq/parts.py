"""Statistics files on their own, and a FeatureSpec's pieces given directly (a mask, group indices and
statistics): both become a Declared, checked like a checkpoint's."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

from .declared import Declared, _attempt
from .safe_load import _not_regular, _Problem, read_stats_file
from .values import CategoryStats, _method_of, _parse_categories, _parse_mask, _parse_stats


def _read_npz_stats(path: Path, where: str) -> tuple[dict[str, CategoryStats], Optional[str]]:
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
    listed = ", ".join(f"{name}: {n}" for name, n in list(sizes.items())[:6]) + (", ..." if len(sizes) > 6 else "")
    return (f"per-category {pair} (method {method or 'not declared'}): {len(sizes)} categories, "
            f"{sum(sizes.values())} columns ({listed})")


def declare_stats_only(decl: Declared, attempt) -> Declared:
    """A statistics file given where a checkpoint was expected: what it holds, and what else is needed."""
    decl.stats_only = True
    read = attempt(_read_npz_stats, decl.path, decl.path.name)
    if read is None:
        return decl
    decl.stats, decl.stats_source = read[0], decl.path.name
    decl.method = _method_of(read[0], read[1])
    decl.problems.append(
        f"{decl.path.name} is a statistics file, not a checkpoint: it holds {describe_stats(decl.stats, decl.method)}, "
        f"but no feature_mask (which extractor columns are kept) and no group_indices (which kept columns each "
        f"category's statistics belong to). Build the loss from it with those two: "
        f"load_feature_spec(stats={str(decl.path)!r}, feature_mask=..., group_indices=...), or check the VQ-VAE "
        f"checkpoint it was saved with"
    )
    return decl


def declare_parts(feature_mask, group_indices=None, stats=None, *, need_stats: bool = True) -> Declared:
    """Declared from the pieces themselves: a mask [D] (bool, or 0/1), {category: kept-column indices}, and
    statistics (an .npz path, or {category: {"mean","std"} / {"median","mad"}}, or {"mean","std"} over all
    columns). The decoder's width is the kept count."""
    is_path = isinstance(stats, (str, Path))
    decl = Declared(path=Path(stats) if is_path else Path("(given arrays)"))
    attempt = _attempt(decl)
    if feature_mask is None:
        decl.problems.append("feature_mask is needed: which of the extractor's columns the decoder reconstructs")
    else:
        decl.feature_mask = attempt(_parse_mask, feature_mask)
    decl.input_dim = decl.num_kept
    if group_indices is not None:
        decl.categories = attempt(_parse_categories, group_indices)
    if not need_stats:
        return decl
    if stats is None:
        decl.problems.append("no normalization statistics given (stats=...): norm=\"stats\" needs them")
    elif is_path:
        path = Path(stats)
        why = _not_regular(path) if path.exists() else "the path does not exist"
        if why:
            decl.problems.append(f"the statistics file {stats} cannot be read: {why}")
        else:
            read = attempt(_read_npz_stats, path, path.name)
            if read is not None:
                decl.stats, decl.stats_source, decl.method = read[0], path.name, _method_of(read[0], read[1])
    else:
        parsed = attempt(_parse_stats, stats, "the statistics given", None)
        if parsed is not None:
            decl.stats, decl.stats_source, decl.method = parsed, "the statistics given", _method_of(parsed, None)
    if decl.stats is not None and "" not in decl.stats and decl.categories is None:
        decl.problems.append(
            f"{decl.stats_source} are per category ({len(decl.stats)} categories) and no group_indices were given: "
            f"pass group_indices={{category: kept-column indices}} to place them"
        )
    return decl
