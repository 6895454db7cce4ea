"""Declared: what a VQ-VAE checkpoint (or a set of given pieces) says, read leniently, with every piece
that could not be read as a problem sentence. declare.py, hybrid.py and parts.py fill it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .layout import HybridClues, HybridLayout
from .safe_load import _Problem
from .values import CategoryStats


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
    other_path: Optional[Path] = None  # that file (used only if it agrees: diagnose.find_notes)
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
