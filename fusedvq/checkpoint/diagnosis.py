"""What does not fit in a declared checkpoint: one sentence per problem, naming the numbers (what `fusedvq
check` prints and CheckpointError lists). Work and memory grow with what the file lists, never with the
widths it declares."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .declared import Declared, declare
from .errors import PathLike, listed, quoted, require_count, require_flag
from .values import CategoryStats, assemble_stats


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
    num_features = require_count("num_features", num_features, "the extractor's width")
    need_stats = require_flag("need_stats", need_stats)
    problems = list(decl.problems)
    mask = decl.feature_mask
    if mask is not None:
        kept = int(mask.sum())
        if num_features is not None and mask.shape[0] != num_features:
            problems.append(_width_problem(mask, num_features))
        if kept == 0:
            problems.append(f"feature_mask keeps none of its {mask.shape[0]} columns")
        elif decl.input_dim is not None and kept != decl.input_dim and not decl.clues.is_hybrid:
            problems.append(
                f"feature_mask keeps {kept} of {mask.shape[0]} columns but the decoder's input_dim is "
                f"{decl.input_dim}: the decoder would reconstruct {decl.input_dim} columns, not {kept}"
                + (" (a hybrid VQ-VAE's initial encoder would add the difference as embedding columns, but this "
                   "checkpoint holds no initial-encoder weights and no family encoded by initial_hybrid)"
                   if kept < decl.input_dim else "")
            )
    if not need_stats or (decl.clues.is_hybrid and decl.hybrid is None):
        return problems  # (a hybrid without a layout: its categories cannot be put in kept columns; said above)
    # Kept-column space: the decoder's width when declared (a hybrid's kept columns), else what the mask keeps.
    K = decl.input_dim if decl.input_dim is not None else (int(mask.sum()) if mask is not None else None)
    if decl.hybrid is not None:
        K = decl.hybrid.num_kept
    if decl.categories is not None and K is not None:
        problems += _group_problems(decl.categories, K)
    if decl.stats is not None:
        problems += _stats_problems(decl.stats, decl.categories, decl.stats_source, K, mask)
    return problems


def _width_problem(mask: np.ndarray, num_features: int) -> str:
    """The mask and the extractor disagree about the feature width: both numbers, and what would fit."""
    D0, kept = mask.shape[0], int(mask.sum())
    text = (f"feature_mask has {D0} entries (the original feature width) but the extractor gives {num_features} "
            f"columns: the VQ-VAE's mask was made for {D0}-column features")
    if num_features > D0:
        return text + f"; pass the {D0} columns it was trained on, in that order"
    beyond = int(mask[num_features:].sum())
    if beyond:
        return text + (f", and {beyond} of its {kept} kept columns lie at or beyond column {num_features}, so "
                       f"no {num_features}-column extractor fits: it must give all {D0} columns, in the order the "
                       f"VQ-VAE was trained on")
    return text + (f"; all {kept} kept columns lie in the first {num_features}, so if the extractor's columns are "
                   f"the first {num_features} of those {D0}, in order, pass feature_mask[:{num_features}]")


def _group_problems(groups: dict[str, np.ndarray], K: int) -> list[str]:
    """Out-of-range, repeated, overlapping and missing kept columns of the categories. Work and memory grow
    with the indices listed, never with K (a checkpoint may declare any input_dim), and the numpy work is
    done once over all categories (a file may declare tens of thousands of them)."""
    problems = []
    names = list(groups)
    G = len(names)
    sizes = np.array([idx.size for idx in groups.values()], dtype=np.int64)
    idx = np.concatenate(list(groups.values())).astype(np.int64) if G else np.zeros(0, dtype=np.int64)
    cat = np.repeat(np.arange(G, dtype=np.int64), sizes)  # each listed index's category
    bad = (idx < 0) | (idx >= K)
    bad_count = np.bincount(cat[bad], minlength=G)
    with_bad, at = np.unique(cat[bad], return_index=True)
    first_bad = dict(zip(with_bad.tolist(), idx[bad][at].tolist()))  # the first out of range, as listed
    # Each category's distinct in-range columns (pairs sorted by category, then column), and how often listed.
    order = np.lexsort((idx[~bad], cat[~bad]))
    pair_cat, pair_col = cat[~bad][order], idx[~bad][order]
    new = np.ones(pair_cat.size, dtype=bool)
    new[1:] = (pair_cat[1:] != pair_cat[:-1]) | (pair_col[1:] != pair_col[:-1])
    starts = np.flatnonzero(new)
    repeated = np.diff(np.append(starts, pair_cat.size)) > 1
    pair_cat, pair_col = pair_cat[starts], pair_col[starts]
    repeat_count = np.bincount(pair_cat[repeated], minlength=G)
    with_repeats, at = np.unique(pair_cat[repeated], return_index=True)
    first_repeat = dict(zip(with_repeats.tolist(), pair_col[repeated][at].tolist()))  # the smallest repeated
    for g in sorted(set(first_bad) | set(first_repeat)):
        if g in first_bad:
            problems.append(
                f"category {quoted(names[g])} has column index {first_bad[g]}, outside the {K} kept columns "
                f"(valid: 0..{K - 1}); {int(bad_count[g])} of its {int(sizes[g])} indices out of range"
            )
        if g in first_repeat:
            problems.append(
                f"category {quoted(names[g])} lists {_count(int(repeat_count[g]), 'kept column')} more than once "
                f"(first: {first_repeat[g]})"
            )
    claimed = np.stack([pair_col, pair_cat], axis=1)  # (kept column, category), once per category
    claimed = claimed[np.lexsort((claimed[:, 1], claimed[:, 0]))]  # by column, then category
    later = np.flatnonzero(claimed[1:, 0] == claimed[:-1, 0]) + 1  # a column claimed again
    firsts = claimed[np.searchsorted(claimed[:, 0], claimed[later, 0]), 1]  # the column's first claimant
    pairs, at, shared = np.unique(firsts * max(G, 1) + claimed[later, 1], return_index=True, return_counts=True)
    for k in np.argsort(at, kind="stable")[:5]:  # the pairs in the order their first shared column comes
        a, b = divmod(int(pairs[k]), max(G, 1))
        problems.append(
            f"categories {quoted(names[a])} and {quoted(names[b])} overlap: both claim "
            f"{_count(int(shared[k]), 'kept column')} (first: {int(claimed[later[at[k]], 0])})"
        )
    if pairs.size > 5:
        problems.append(f"... and {pairs.size - 5} more overlapping pairs of categories")
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
    declared = listed(list(groups), 6)
    for name in stats:
        if name not in groups:
            problems.append(
                f"{source} has statistics for category {quoted(name)}, which group_indices does not declare "
                f"(declared: {declared})"
            )
    for name, idx in groups.items():
        if name not in stats:
            problems.append(f"{source} has no statistics for category {quoted(name)} ({idx.size} columns)")
            continue
        s = stats[name]
        sized = True
        for what, arr in ((s.center_name, s.center), (s.scale_name, s.scale)):
            if arr.size != idx.size:
                sized = False
                problems.append(
                    f"{what} for category {quoted(name)} has {arr.size} entries but the category covers "
                    f"{idx.size} columns"
                )
        if sized:
            problems += _value_problems(name, s, idx if K is None or ((idx >= 0) & (idx < K)).all() else None, source)
    return problems


def _value_problems(name: str, s: CategoryStats, idx: Optional[np.ndarray], source: str) -> list[str]:
    """σ finite and > 0, μ finite; positions named by entry and kept column."""
    label = f"for category {quoted(name)}" if name else f"in {source}"
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


def find_notes(decl: Declared) -> list[str]:
    """What was found and deliberately not used, as sentences (warned by load_feature_spec, printed as notes
    by `fusedvq check`): a statistics file beside a checkpoint that carries complete statistics of its own,
    when it cannot be read or disagrees with them. The checkpoint's own were saved with its model; a stale
    file one folder up is the likelier mistake. Call it when find_problems found none."""
    notes = list(decl.notes)
    if decl.other_stats is not None:
        why = _disagreement(decl)
        if why:
            notes.append(
                f"{decl.other_path} was not used: {why}; the checkpoint's own normalization_stats were (they were "
                f"saved with its model). Pass stats='checkpoint' (CLI: --stats checkpoint) to say so, or that "
                f"file's path to use it instead"
            )
    return notes


def _disagreement(decl: Declared) -> Optional[str]:
    """How the statistics file beside differs from the checkpoint's own, or None when they agree."""
    K = decl.hybrid.num_kept if decl.hybrid is not None else (decl.input_dim or decl.num_kept)
    try:
        mine = assemble_stats(decl.stats, decl.categories, K, decl.feature_mask)
        theirs = assemble_stats(decl.other_stats, decl.categories, K, decl.feature_mask)
    except (ValueError, KeyError, IndexError):
        return "it holds statistics for other categories or lengths than the checkpoint's own"
    if _stats_problems(decl.other_stats, decl.categories, "it", K, decl.feature_mask):
        return "its statistics do not fit the checkpoint's categories"
    for what, a, b in (("mean", mine[0], theirs[0]), ("std", mine[1], theirs[1])):
        close = np.isclose(a, b, rtol=1e-5, atol=1e-7)
        if not close.all():
            k = int(np.flatnonzero(~close)[0])
            return (f"it disagrees with the checkpoint's own: {what} of kept column {k} is {b[k]:.6g} there and "
                    f"{a[k]:.6g} in the checkpoint ({int((~close).sum())} of {K} columns differ)")
    return None


def diagnose(path: PathLike, num_features: Optional[int] = None, *, trust: bool = False,
             stats: Optional[PathLike] = None, need_stats: bool = True) -> list[str]:
    """One sentence per problem that keeps the checkpoint from fitting a num_features-wide extractor."""
    num_features = require_count("num_features", num_features, "the extractor's width")
    decl = declare(path, trust=trust, stats=stats, need_stats=need_stats)
    return find_problems(decl, num_features, need_stats=need_stats)
