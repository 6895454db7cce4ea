"""A hybrid checkpoint's layout (layout.py) declared: decl.hybrid, or a problem saying what is missing."""

from __future__ import annotations

from .declared import Declared
from .layout import HybridLayout, first_embedding_from_groups, first_embedding_from_names
from .values import MAX_LIST_ENTRIES as MAX_EMBEDDING
from .values import _parse_categories


def declare_hybrid(decl: Declared, data: dict, attempt, need_stats: bool) -> None:
    """decl.hybrid from the checkpoint alone (layout.py), or a problem saying exactly what is missing; the
    categories become kept-column ones (statistics are per kept column), model_config's kept aside."""
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
    if clues.num_embedding is not None and clues.num_embedding != c:
        decl.problems.append(
            f"{what} whose initial encoder gives {clues.num_embedding} embedding columns, but the decoder's "
            f"input_dim {width} minus the {K} kept feature columns leaves {c}"
        )
        return
    kept_groups = None
    if data.get("pre_model_group_indices") is not None:
        kept_groups = attempt(_parse_categories, data["pre_model_group_indices"])
    candidates, initial = [], None
    if kept_groups is not None and decl.categories is not None:
        candidates, initial = first_embedding_from_groups(kept_groups, decl.categories, K, c)
    by_names, manual = first_embedding_from_names(decl.feature_names, clues.family, K)
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
            f"feature_names end the {clues.family!r} family's columns at {by_names}; the layout is ambiguous"
        )
        return
    if len(candidates) == 1:
        p, source = candidates[0], "pre_model_group_indices against model_config's group_indices"
    elif by_names is not None and (not candidates or by_names in candidates):
        p, source = by_names, f"feature_names (the {clues.family!r} family's columns)"
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
                f"the statistics of category {initial!r} cannot be placed: the checkpoint has no "
                f"pre_model_group_indices, and model_config lists that category's columns sorted with the "
                f"embedding columns, not in the order of its statistics"
            )
