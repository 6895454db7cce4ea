"""What a VQ-VAE checkpoint declares, read leniently: every piece that cannot be read becomes a problem
sentence (Declared.problems), never an exception. declare() reads a checkpoint (reading.py), its values
(values.py), a hybrid's layout (hybrid.py) and the statistics beside it; a statistics file on its own, or the
pieces given directly (declare_parts), become a Declared too. The package's __init__ documents the format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .errors import CheckpointError, PathLike, _Problem, require_flag, require_path
from .hybrid import HybridClues, HybridLayout, declare_hybrid, hybrid_clues
from .reading import _not_regular, read_checkpoint, resolve_checkpoint
from .values import (
    CategoryStats, _method_of, _parse_categories, _parse_input_dim, _parse_mask, _parse_stats, _read_npz_stats,
    describe_stats, entry_budget, is_stats_file,
)

STATS_FILE = "normalization_stats.npz"


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
    other_path: Optional[Path] = None  # that file (used only if it agrees: diagnosis.find_notes)
    feature_names: Optional[list] = None
    hybrid: Optional[HybridLayout] = None  # the decoder's embedding columns, for a hybrid VQ-VAE
    clues: HybridClues = field(default_factory=HybridClues)  # traces of an initial encoder
    decoder_categories: Optional[dict[str, np.ndarray]] = None  # hybrid: model_config's, in decoder columns
    stats_only: bool = False  # the path is a statistics file, not a checkpoint
    problems: list[str] = field(default_factory=list)  # pieces that could not be read
    notes: list[str] = field(default_factory=list)  # what was found and deliberately not used (no problem)

    @property
    def num_kept(self) -> Optional[int]:
        return int(self.feature_mask.sum()) if self.feature_mask is not None else None


def _attempt(decl: Declared):
    """fn(*args), or None with its problem recorded on decl."""
    def attempt(fn, *args):
        try:
            return fn(*args)
        except _Problem as p:
            decl.problems.append(str(p))
            return None
    return attempt


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
    bad file; a file that cannot be read at all gives a Declared with one problem. Arguments of the wrong
    kind are a TypeError.
    """
    path = require_path("path", path, "a checkpoint file or folder")
    trust, need_stats = require_flag("trust", trust), require_flag("need_stats", need_stats)
    if stats is not None and not (isinstance(stats, str) and stats == "checkpoint"):
        require_path("stats", stats, 'a statistics .npz (or "checkpoint", or None)')
    decl = Declared(path=path)
    attempt = _attempt(decl)
    try:
        decl.path = resolve_checkpoint(path)
        if is_stats_file(decl.path):
            return declare_stats_only(decl, attempt)
        data = read_checkpoint(decl.path, trust=trust)
    except CheckpointError as err:
        decl.problems += err.problems
        lone = sorted(Path(path).glob("normalization_stats*.npz")) if Path(path).is_dir() else []
        if len(lone) == 1 and lone[0].is_file():  # a folder holding only statistics: say what they are
            decl.path = lone[0]
            declare_stats_only(decl, attempt)
        return decl
    with entry_budget(decl.path.stat().st_size):
        _declare_checkpoint(decl, data, attempt, stats, need_stats)
    return decl


def _declare_checkpoint(decl: Declared, data: dict, attempt, stats: Optional[PathLike], need_stats: bool) -> None:
    """decl filled from a checkpoint's dict (declare)."""
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
    decl.clues = hybrid_clues(data)
    if decl.clues.is_hybrid:
        declare_hybrid(decl, data, attempt, need_stats)
    if need_stats:
        _declare_stats(decl, data, stats, attempt)


def _declare_stats(decl: Declared, data: dict, stats: Optional[PathLike], attempt) -> None:
    """Fill decl.stats, from the checkpoint itself first, else from the .npz beside it (or `stats`).

    The checkpoint's own statistics were saved with its model: when it has them, a statistics file found
    beside it goes to decl.other_stats, only to be compared (a file that disagrees, or cannot be read, is
    not used: a note, diagnosis.find_notes). An explicit `stats` path is used instead of both.
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
        if npz_paths and in_file is not None and stats is None:
            try:  # only compared with the checkpoint's own: unreadable, it is a note, not a problem
                beside = _read_npz_stats(npz_paths[0], where)
            except _Problem as why:
                decl.notes.append(f"{npz_paths[0]} was not used ({why}); the checkpoint's own normalization_stats "
                                  f"were")
            decl.other_path = npz_paths[0]
        elif npz_paths:
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
# A statistics file on its own, and the pieces given directly
# ---------------------------------------------------------------------------------------------------


def declare_stats_only(decl: Declared, attempt) -> Declared:
    """A statistics file given where a checkpoint was expected: what it holds, and what else is needed."""
    decl.stats_only = True
    with entry_budget(decl.path.stat().st_size):
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
    need_stats = require_flag("need_stats", need_stats)
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
