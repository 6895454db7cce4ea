"""VQ-VAE checkpoints → the loss: safe loading, what the checkpoint declares, and what does not fit.

A checkpoint written by a VQ-VAE trainer is a torch `.pt` dict:

    feature_mask         bool [D0]: which of the D0 original feature columns survived cleaning (K kept)
    model_config         {"input_dim": K (the decoder's width),
                          "group_indices": {category: [kept-column indices in [0, K)]}, ...}
    normalization_stats  optional {category: {"mean", "std"} or {"median", "mad"}} (or the trainer's own
                         NormalizationStats objects, read as records), one entry per column of the
                         category, in the order of its group_indices
    pre_model_group_indices  hybrid VQ-VAEs: the categories in kept columns (model_config's are then in
                         decoder columns, which hold c embedding columns more: hybrid.py)
    model_state_dict, config["families"], feature_names   (looked at for a hybrid's layout only)

and often a `normalization_stats.npz` beside it with `{category}_mean` / `{category}_std` (or `_median` /
`_mad`) arrays and `_normalization_method` ("standard" or "mad"). Per-category statistics are scattered
through group_indices into one masked-space μ [K], σ [K]; median/MAD is the same affine map
z = (x − median)/mad, so it is used exactly like mean/std. A checkpoint's own statistics (saved with its
model) are used before such a file; the file, when it disagrees or cannot be read, is not used and a
StatsNotUsedWarning names it. stats=... chooses explicitly.

Safety: files are read with `torch.load(weights_only=True)` plus an allow-list of the numpy types such
files contain and inert stand-ins for foreign classes (records.py), in a child process within time and
memory limits (isolation.py); anything that would run code is refused with a message naming it, before
any of it runs; `trust=True` loads it with full unpickling and warns. A statistics .npz on its own, or the
pieces themselves, build a FeatureSpec too (declared.py). `.npz` files are read with `allow_pickle=False`.

Layers, imported one way (each imports only those before it):

    errors.py     CheckpointError, the warnings, printable; names quoted short; the arguments checked
    records.py    inert stand-ins for the classes a file pickles (nothing of theirs imported or run)
    wire.py       a read result as plain data across the pipe from the bounded child, and back
    limits.py     how long and how much memory a read may take; the overrides, checked
    isolation.py  the bounded child: a reader run under a wall clock and a memory limit
    archives.py   zip directories sized before they are parsed, duplicate members refused
    pickles.py    a file's pickles scanned without running them
    inert.py      the inert load (run in the bounded child)
    reading.py    path → dict: the file found and checked, then read in the bounded child; .npz statistics
    values.py     dict values → bounded arrays (mask, width, categories, statistics; one entry budget per
                  file, so that views repeating memory cannot expand); statistics placed
    hybrid.py     a hybrid VQ-VAE's embedding columns among the decoder's
    declared.py   dict → Declared (lenient: what cannot be read becomes a problem sentence)
    diagnosis.py  Declared → one sentence per problem, naming the numbers (diagnose)
    __init__.py   FeatureSpec, only when there are no problems; the losses build themselves from it

Nothing here imports loss code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .declared import Declared, declare, declare_parts
from .errors import (
    CheckpointError, PathLike, StatsNotUsedWarning, UnsafeLoadWarning, printable, require_count, require_flag,
    require_path,
)
from .hybrid import HybridLayout
from .diagnosis import diagnose, find_notes, find_problems
from .reading import read_checkpoint, read_stats_file, resolve_checkpoint
from .values import CategoryStats, assemble_stats, describe_stats


@dataclass(frozen=True)
class FeatureSpec:
    """What the loss needs from a checkpoint, checked consistent.

    feature_mask [D] bool over the extractor's columns; index [K] int64 = the kept columns in order;
    mean, std [K] float64 in the masked space (the kept feature columns), or None when not loaded.

    The categories in two spaces, one order (the checkpoint's): `categories` lists each category's kept
    feature columns (in [0, K): what the statistics and the feature-only loss use; a hybrid's
    pre_model_group_indices), `decoder_categories` its decoder columns (in [0, input_dim): model_config's
    group_indices, where a hybrid's INITIAL category also holds its c embedding columns; what the trainer's
    `{category}/reconstruction_mse` averages over). They are the same unless hybrid; decoder_categories is
    empty when the checkpoint does not declare them (a hybrid with only pre_model_group_indices).
    """

    path: Path
    feature_mask: torch.Tensor  # [D] bool
    index: torch.Tensor  # [K] int64
    input_dim: int  # the decoder's width (K, or K + c for a hybrid)
    categories: dict[str, tuple[int, ...]]  # category → kept-column indices (empty when not declared)
    mean: Optional[torch.Tensor]  # [K] float64
    std: Optional[torch.Tensor]  # [K] float64
    method: Optional[str]  # "standard" (mean/std) | "mad" (median/mad) | None
    stats_source: Optional[str]
    feature_names: Optional[list] = None
    hybrid: Optional[HybridLayout] = None  # a hybrid VQ-VAE's embedding columns among the decoder's
    decoder_categories: dict = field(default_factory=dict)  # category → decoder-column indices (see above)

    @property
    def recon_columns(self) -> torch.Tensor:
        """[K] int64: the decoder column that reconstructs each kept feature column (arange(K) unless hybrid)."""
        if self.hybrid is None:
            return torch.arange(self.num_kept)
        return torch.from_numpy(self.hybrid.recon_columns())

    @property
    def embedding_columns(self) -> range:
        """The decoder columns that reconstruct no extracted feature (a hybrid's embeddings; empty otherwise)."""
        return self.hybrid.embedding_columns() if self.hybrid is not None else range(self.input_dim, self.input_dim)

    @property
    def num_features(self) -> int:
        """D, the width the extractor must give (the mask's length)."""
        return int(self.feature_mask.shape[0])

    @property
    def num_kept(self) -> int:
        """K, the kept feature columns (the decoder's width unless hybrid)."""
        return int(self.index.shape[0])

    def stats_arguments(self, norm: str) -> dict:
        """The statistics a loss built from this spec takes: μ, σ in the masked space for norm="stats",
        none otherwise."""
        if norm != "stats":
            return {}
        if self.mean is None:
            raise ValueError(f'norm="stats" needs statistics, and this FeatureSpec ({self.path}) holds none')
        return dict(mean=self.mean, std=self.std, stats_space="masked")


def load_feature_spec(path: Optional[PathLike] = None, *, num_features: Optional[int] = None, trust: bool = False,
                      stats=None, require_stats: bool = True, feature_mask=None,
                      group_indices=None) -> FeatureSpec:
    """Mask, index, D, K, decoder input_dim, categories and masked-space μ, σ from a checkpoint (file or
    folder), or from the pieces themselves.

    path: the checkpoint. num_features: the extractor's width, checked against the mask. stats: None (the
    checkpoint's own, else normalization_stats.npz beside it), "checkpoint", or an .npz path; without a
    path also {category: {"mean","std"}} arrays. require_stats=False reads neither group_indices nor
    statistics (for norm="none" / "batch").
    feature_mask, group_indices: without a path, the spec is built from them and `stats` (e.g. a
    normalization_stats.npz on its own): mask [D] bool, {category: kept-column indices}.
    Raises CheckpointError listing every problem (the same sentences `fusedvq check` prints); TypeError for
    an argument of the wrong kind (trust and require_stats are True or False, never a string; num_features
    is a positive int).
    """
    trust, require_stats = require_flag("trust", trust), require_flag("require_stats", require_stats)
    num_features = require_count("num_features", num_features, "the extractor's width")
    if path is not None:
        require_path("path", path, "a checkpoint file or folder")
    if path is None:
        decl = declare_parts(feature_mask, group_indices, stats, need_stats=require_stats)
    elif feature_mask is not None or group_indices is not None:
        raise ValueError("pass either a checkpoint path or feature_mask / group_indices, not both")
    else:
        decl = declare(path, trust=trust, stats=stats, need_stats=require_stats)
    problems = find_problems(decl, num_features, need_stats=require_stats)
    if problems:
        raise CheckpointError(problems, decl.path)
    for note in find_notes(decl):
        warnings.warn(printable(note), StatsNotUsedWarning, stacklevel=2)
    mask = torch.from_numpy(decl.feature_mask.copy())
    mean = std = None
    if require_stats:
        mu, sigma = assemble_stats(decl.stats, decl.categories, decl.num_kept, decl.feature_mask)
        mean, std = torch.from_numpy(mu), torch.from_numpy(sigma)
    categories = {name: tuple(int(i) for i in idx) for name, idx in (decl.categories or {}).items()}
    decoder = decl.decoder_categories if decl.hybrid is not None else decl.categories
    decoder_categories = {name: tuple(int(i) for i in decoder[name]) for name in categories if name in decoder
                          } if decoder and set(decoder) == set(categories) else {}
    return FeatureSpec(
        path=decl.path, feature_mask=mask, index=mask.nonzero().squeeze(1), input_dim=decl.input_dim,
        categories=categories, mean=mean, std=std, method=decl.method if require_stats else None,
        stats_source=decl.stats_source if require_stats else None, feature_names=decl.feature_names,
        hybrid=decl.hybrid, decoder_categories=decoder_categories,
    )  # fmt: skip


__all__ = [
    "CheckpointError", "UnsafeLoadWarning", "StatsNotUsedWarning", "FeatureSpec", "Declared", "CategoryStats",
    "resolve_checkpoint", "read_checkpoint", "read_stats_file", "declare", "find_problems", "find_notes", "diagnose",
    "assemble_stats", "load_feature_spec",
]
