"""Hybrid VQ-VAEs: where the decoder's embedding columns sit among its feature columns, derived from the
checkpoint alone.

In a hybrid VQ-VAE an initial-condition encoder (a CNN over the raw initial fields) adds `c` embedding
columns to the cleaned features, right after the INITIAL family's hand-made columns. The decoder is
`input_dim = K + c` wide, K = the kept feature columns; with p = the position of the first embedding
column (the number of kept columns up to and including the INITIAL family's):

    decoder column j < p          ↔  kept feature column j
    p <= j < p + c                ↔  embedding column j − p (no extracted feature: left to the caller)
    j >= p + c                    ↔  kept feature column j − c

The trainer shifts the categories the same way (model_config's group_indices, in decoder columns) and
adds the embedding columns to the INITIAL category, while its statistics stay per kept column
(pre_model_group_indices). The layout is derived from, in order: the embedding width (the initial
encoder's last layer in model_state_dict, else the family's cnn_embedding_dim), then p from the two sets
of group indices, cross-checked with feature_names' "family::" prefixes when both are present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from .errors import quoted
from .values import MAX_LIST_ENTRIES as MAX_EMBEDDING
from .values import _parse_categories

HYBRID_ENCODERS = ("initial_hybrid", "InitialHybridEncoder")
MAX_TRIES = 256  # candidate positions of the embedding columns checked against the group indices
ENCODER_PREFIXES = ("initial_encoder.", "_orig_mod.initial_encoder.")
# The initial encoder's last layer: its rows are the embedding columns.
EMBEDDING_LAYER = ("cnn_encoder.fc.weight", "cnn_encoder.bn_final.weight")


@dataclass(frozen=True)
class HybridLayout:
    """The decoder's columns of a hybrid VQ-VAE: kept feature columns with gap_width embedding columns
    inserted at gap_at (decoder columns [gap_at, gap_at + gap_width); the loss's target_gap=(gap_at,
    gap_width))."""

    num_kept: int  # K
    gap_at: int  # p above: the first embedding column
    gap_width: int  # c above: the embedding columns
    family: Optional[str] = None  # the INITIAL family's name in config["families"], when declared
    num_initial: Optional[int] = None  # its hand-made columns (just before the embedding columns), when known
    source: str = ""  # what p was derived from, in words

    @property
    def width(self) -> int:
        """The decoder's input_dim, K + c."""
        return self.num_kept + self.gap_width

    def recon_columns(self) -> np.ndarray:
        """[K] int64: the decoder column of each kept feature column, in the kept columns' order."""
        k = np.arange(self.num_kept, dtype=np.int64)
        return np.where(k < self.gap_at, k, k + self.gap_width)

    def embedding_columns(self) -> range:
        return range(self.gap_at, self.gap_at + self.gap_width)

    def to_kept(self, columns: np.ndarray) -> np.ndarray:
        """Decoder columns → kept columns (embedding columns dropped)."""
        columns = np.asarray(columns, dtype=np.int64)
        gap_at, gap_width = self.gap_at, self.gap_width
        columns = columns[(columns < gap_at) | (columns >= gap_at + gap_width)]
        return np.where(columns < gap_at, columns, columns - gap_width)


@dataclass
class HybridClues:
    """What a checkpoint says about an initial encoder, read leniently (None where absent)."""

    encoder_keys: int = 0  # model_state_dict entries of the initial encoder
    embedding_rows: Optional[int] = None  # rows of its last layer
    family: Optional[str] = None
    family_embedding: Optional[int] = None  # the family's encoder_params["cnn_embedding_dim"]
    family_manual: Optional[int] = None  # its encoder_params["manual_dim"], when given
    families: tuple = ()  # every family encoded by initial_hybrid (more than one: no layout is defined)

    @property
    def is_hybrid(self) -> bool:
        return self.encoder_keys > 0 or self.family is not None

    @property
    def gap_width(self) -> Optional[int]:
        return self.embedding_rows if self.embedding_rows is not None else self.family_embedding

    def evidence(self) -> str:
        said = []
        if self.encoder_keys:
            said.append(f"{self.encoder_keys} initial-encoder entries in model_state_dict")
        if len(self.families) > 1:
            said.append(f"the families {_names(self.families)} encoded by {HYBRID_ENCODERS[0]}")
        elif self.family is not None:
            said.append(f"the family {quoted(self.family)} encoded by {HYBRID_ENCODERS[0]}")
        return " and ".join(said)

    def ambiguity(self) -> Optional[str]:
        """Why the embedding columns' position is undefined (several hybrid families), or None."""
        if len(self.families) < 2:
            return None
        return (f"a hybrid VQ-VAE adds its embedding columns after the columns of the one family encoded by "
                f"{HYBRID_ENCODERS[0]}, and config['families'] has {len(self.families)} "
                f"({_names(self.families)}): where the embedding columns sit among the decoder's is undefined, "
                f"so no layout is derived")


def _names(names, shown: int = 4) -> str:
    if len(names) <= 2:
        return " and ".join(map(quoted, names))
    return ", ".join(map(quoted, names[:shown])) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _positive_int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0 else None


def hybrid_clues(data: Mapping) -> HybridClues:
    """The initial encoder's traces in a checkpoint dict: state-dict keys, its last layer, the families."""
    clues = HybridClues()
    state = data.get("model_state_dict")
    if isinstance(state, Mapping):
        for key, value in state.items():
            if not isinstance(key, str):  # (never str() a key: memo references can make it exponentially large)
                continue
            prefix = next((p for p in ENCODER_PREFIXES if key.startswith(p)), None)
            if prefix is None:
                continue
            clues.encoder_keys += 1
            if key[len(prefix):] in EMBEDDING_LAYER and clues.embedding_rows is None:
                shape = getattr(value, "shape", None)
                if shape is not None and len(shape) >= 1:
                    clues.embedding_rows = int(shape[0])
    config = data.get("config")
    families = config.get("families") if isinstance(config, Mapping) else None
    families = families if isinstance(families, Mapping) else data.get("families")
    if isinstance(families, Mapping):
        hybrid = []
        for name, family in families.items():
            encoder = family.get("encoder") if isinstance(family, Mapping) and isinstance(name, str) else None
            if isinstance(encoder, str) and encoder in HYBRID_ENCODERS:
                hybrid.append(name)
                if len(hybrid) > 1:
                    continue  # (declare_hybrid refuses the layout, naming them)
                clues.family = name
                params = family.get("encoder_params")
                params = params if isinstance(params, Mapping) else {}
                # The trainer's default when the family does not say.
                clues.family_embedding = _positive_int(params.get("cnn_embedding_dim", 28))
                clues.family_manual = _positive_int(params.get("manual_dim"))
        clues.families = tuple(hybrid)
    return clues


def gap_at_from_groups(kept_groups: Mapping[str, np.ndarray], decoder_groups: Mapping[str, np.ndarray],
                       num_kept: int, gap_width: int) -> tuple[list[int], Optional[str]]:
    """The positions p consistent with both sets of group indices, and the INITIAL category's name.

    Every category's decoder columns must be its kept columns shifted by c from p on, in the same order;
    the INITIAL category's also hold [p, p + c) (as a sorted set). Work is linear in the listed indices
    for each candidate left after the ordinary categories bound p.
    """
    c = gap_width
    if set(kept_groups) != set(decoder_groups):
        return [], None
    initial = [n for n in kept_groups if decoder_groups[n].size - kept_groups[n].size == c]
    if len(initial) != 1:
        return [], None
    lo, hi = 0, num_kept  # p in [lo, hi]
    for name, kept in kept_groups.items():
        if name == initial[0]:
            continue
        dec = decoder_groups[name]
        if dec.size != kept.size:
            return [], initial[0]
        same, shifted = dec == kept, dec == kept + c
        if not (same | shifted).all():
            return [], initial[0]
        if same.any():
            lo = max(lo, int(kept[same].max()) + 1)
        if shifted.any():
            hi = min(hi, int(kept[shifted].min()))
    kept, dec = kept_groups[initial[0]], np.unique(decoder_groups[initial[0]])
    # p starts a run of c consecutive decoder columns of the INITIAL category: only such p are tried, and at
    # most MAX_TRIES of them (each try is linear), so a crafted file cannot make this quadratic.
    if dec.size < c:
        return [], initial[0]
    starts = dec[: dec.size - c + 1][dec[c - 1 :] - dec[: dec.size - c + 1] == c - 1]
    starts = starts[(starts >= lo) & (starts <= hi)]
    found = []
    for p in starts[:MAX_TRIES].tolist():
        mapped = np.where(kept < p, kept, kept + c)
        if np.array_equal(np.union1d(mapped, np.arange(p, p + c)), dec):
            found.append(p)
    if starts.size > MAX_TRIES and found:
        found.append(int(starts[-1]))  # not tried: counted as one more possibility (ambiguous)
    return found, initial[0]


def gap_at_from_names(names: Optional[list], family: Optional[str],
                      num_kept: int) -> tuple[Optional[int], Optional[int]]:
    """(p, hand-made columns) from feature_names, one per kept column: just after the last "family::" name,
    when they are contiguous. Names of another length (e.g. of all original columns) say nothing here."""
    if not names or family is None or len(names) != num_kept:
        return None, None
    prefix = f"{family}::"
    at = [i for i, n in enumerate(names) if isinstance(n, str) and n.startswith(prefix)]
    if not at or at[-1] - at[0] + 1 != len(at):
        return None, None
    return at[-1] + 1, len(at)


# ---------------------------------------------------------------------------------------------------
# The layout declared: decl.hybrid, or a problem saying what is missing
# ---------------------------------------------------------------------------------------------------


def declare_hybrid(decl, data: dict, attempt, need_stats: bool) -> None:
    """decl.hybrid (decl: the Declared being filled, declared.py) from the checkpoint alone, or a problem
    saying exactly what is missing; the categories become kept-column ones (statistics are per kept column),
    model_config's kept aside."""
    clues, mask, width = decl.clues, decl.feature_mask, decl.input_dim
    what = f"the checkpoint is a hybrid VQ-VAE ({clues.evidence()})"
    if clues.ambiguity() is not None:
        decl.problems.append(f"{what}, but {clues.ambiguity()}")
        return
    if mask is None or width is None:
        return  # the missing piece is already a problem
    K = int(mask.sum())
    c = width - K
    if c > MAX_EMBEDDING:
        decl.problems.append(f"{what}, but its decoder's input_dim {width} would leave {c:,} embedding columns beside "
                             f"the {K} kept feature columns, more than any encoder gives")
        return
    if c <= 0:
        decl.problems.append(f"{what}, but its decoder's input_dim {width} leaves no columns for embeddings beside "
                             f"the {K} kept feature columns")
        return
    if clues.gap_width is not None and clues.gap_width != c:
        decl.problems.append(
            f"{what} whose initial encoder gives {clues.gap_width} embedding columns, but the decoder's "
            f"input_dim {width} minus the {K} kept feature columns leaves {c}"
        )
        return
    kept_groups = None
    if data.get("pre_model_group_indices") is not None:
        kept_groups = attempt(_parse_categories, data["pre_model_group_indices"])
    candidates, initial = [], None
    if kept_groups is not None and decl.categories is not None:
        candidates, initial = gap_at_from_groups(kept_groups, decl.categories, K, c)
    by_names, manual = gap_at_from_names(decl.feature_names, clues.family, K)
    if kept_groups is not None and decl.categories is not None and not candidates:
        decl.problems.append(
            f"{what}, but its pre_model_group_indices and model_config's group_indices do not describe one "
            f"layout: model_config's must be the kept ones, shifted by the {c} embedding columns from one "
            f"position on, with those {c} columns added to the INITIAL family's category"
        )
        return
    if len(candidates) == 1 and by_names is not None and by_names != candidates[0]:
        decl.problems.append(
            f"{what}: its group indices put the {c} embedding columns at decoder column {candidates[0]}, but its "
            f"feature_names end the {quoted(clues.family)} family's columns at {by_names}; the layout is ambiguous"
        )
        return
    if len(candidates) == 1:
        p, source = candidates[0], "pre_model_group_indices against model_config's group_indices"
    elif by_names is not None and (not candidates or by_names in candidates):
        p, source = by_names, f"feature_names (the {quoted(clues.family)} family's columns)"
    else:
        have = []
        if kept_groups is None:
            have.append("no pre_model_group_indices (the categories in kept feature columns)")
        elif decl.categories is None:
            have.append("no group_indices in model_config (the categories in decoder columns)")
        else:
            have.append(f"group indices that fit {len(candidates)} positions ({candidates[0]}..{candidates[-1]})")
        have.append("no feature_names naming the initial family's columns" if by_names is None
                    else f"feature_names that put them at {by_names}")
        decl.problems.append(
            f"{what}, but where its {c} embedding columns sit among the decoder's {width} cannot be derived: it "
            f"has {' and '.join(have)}"
        )
        return
    decl.hybrid = HybridLayout(K, p, c, clues.family, manual or clues.family_manual, source)
    decl.decoder_categories = decl.categories
    if kept_groups is not None:
        decl.categories = kept_groups
    elif decl.categories is not None:
        decl.categories = {name: decl.hybrid.to_kept(idx) for name, idx in decl.categories.items()}
        lo, hi = p, p + c
        initial = next((n for n, idx in decl.decoder_categories.items() if ((idx >= lo) & (idx < hi)).any()), None)
        if need_stats and initial is not None:
            decl.problems.append(
                f"the statistics of category {quoted(initial)} cannot be placed: the checkpoint has no "
                f"pre_model_group_indices, and model_config lists that category's columns sorted with the "
                f"embedding columns, not in the order of its statistics"
            )
