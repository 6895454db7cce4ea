"""The checks of a hybrid's objective (the routing point's, ops/__init__.py; the partials', partials.py): the
caller's embeddings [B, c] against the features, the target [B, K + c] (or the partials) and the gap (at, c)
and weights — shapes, dtypes and devices only (free: no values read), each error naming the numbers."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.plan import Gap
from ..strict import check_dense


def check_embeddings(embeddings: Optional[Tensor], features: Tensor, target: Tensor, plan) -> None:
    """embeddings [B, c] fit this call (None: the plan's weights must then be the K feature columns')."""
    c, K = plan.gap.width, plan.columns.index.shape[0]  # (c: as the messages write it)
    weight = plan.weight
    if embeddings is None:  # (only called then when the weights are not [K])
        raise ValueError(f"weight has {weight.shape[0]} entries, one per decoder column (K + c = {K} + {c}): the "
                         f"objective over all K + c columns, which needs embeddings=[B, {c}]; without them the "
                         f"loss compares the {K} feature columns and takes {K} weights")
    if c == 0:
        _refuse_without_gap(f"the target's {K} columns")
    check_embedding_tensor(embeddings, features.shape[0], plan.gap, target, "the target is")
    if weight is not None and weight.shape[0] != K + c:
        raise ValueError(f"weight has {weight.shape[0]} entries but the objective over the decoder's K + c = {K + c} "
                         f"columns (with embeddings) takes one per decoder column: pass {K + c} weights")


def check_partial_embeddings(embeddings, rows: int, partial: Tensor, gap: Gap) -> None:
    """A hybrid's embeddings [rows, gap.width] for the partials' Gap, in partial's dtype and on its device."""
    if gap.width == 0:
        _refuse_without_gap(f"each partial's {partial.shape[-1]} columns")
    if isinstance(embeddings, Tensor):
        check_dense(embeddings, "embeddings")  # (the meta device too)
    check_embedding_tensor(embeddings, rows, gap, partial, "the partials are")


def _refuse_without_gap(columns: str):
    raise ValueError(f"embeddings were given, but this loss has no embedding columns (target_gap=(0, 0)): {columns} "
                     f"are all feature columns. A hybrid's objective needs target_gap=(at, width) (from_checkpoint "
                     f"sets it from a hybrid checkpoint)")


def check_embedding_tensor(embeddings, rows: int, gap: Gap, like: Tensor, name: str) -> None:
    """embeddings [rows, c] for a Gap (at, c), a dense tensor in the dtype and on the device of `like`, the
    tensor they are compared with (name: "the target is", "the partials are", as the errors say it)."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"embeddings must be a torch.Tensor [B, {gap.width}], got {type(embeddings).__name__}")
    if embeddings.is_nested or embeddings.layout != torch.strided:
        raise TypeError("embeddings must be a dense (strided) tensor, got a "
                        + ("nested" if embeddings.is_nested else str(embeddings.layout).replace("torch.", "")) + " one")
    if embeddings.dim() != 2 or embeddings.shape[1] != gap.width:
        raise ValueError(f"embeddings must be [B, {gap.width}] (the c = {gap.width} embedding columns, decoder "
                         f"columns {gap.at}..{gap.at + gap.width - 1}), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] != rows:
        raise ValueError(f"embeddings have {embeddings.shape[0]} rows but features have {rows}: the batch sizes must "
                         f"match")
    if embeddings.dtype != like.dtype:
        raise TypeError(f"embeddings are {embeddings.dtype} but {name} {like.dtype}: pass them in one dtype "
                        f"(e.g. embeddings.to({like.dtype}))")
    if embeddings.device != like.device:
        raise ValueError(f"embeddings are on {embeddings.device} but {name} on {like.device}: put both on one device")
