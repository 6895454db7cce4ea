"""Cross-rank batch statistics for norm="batch" (sync_stats=True), as SyncBatchNorm does them.

Forward: each rank's (count, shift [K], mean [K], M2 [K]) are all-gathered and merged with Chan's formula
in rank order, in float64 (the same numbers on every rank), after a fixed-size header that checks that
every rank pools the same K columns in one dtype with one eps (one host synchronization per forward).
Backward: the per-column gradient sums S [2, K] are all-reduced.
Ranks with unequal batch sizes, or none at all, take part in every collective, so nobody waits forever.
The registered ops receive a process group as a string key (op schemas cannot carry a ProcessGroup).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from ..cpu.batch import finalize_moments
from ..cpu.moments import merge_moments

# Keys of the process groups in use; a group that is destroyed (no reference left) drops out by itself.
_groups: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()
WORLD = "world"


def group_key(process_group=None) -> str:
    """The key naming process_group (None: the default group) in the op's schema; checks it can be used."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "sync_stats=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group(...) first (or pass sync_stats=False)"
        )
    if process_group is None:
        return WORLD
    key = f"group-{id(process_group)}"
    _groups[key] = process_group
    return key


def _group(key: str):
    if key == WORLD:
        return None
    group = _groups.get(key)
    if group is None:
        raise RuntimeError(f"the process group of this loss ({key}) no longer exists: it was destroyed")
    return group


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _check_ranks_agree(key: str, K: int, dtype: torch.dtype, eps: float, device: torch.device) -> None:
    """Every rank must pool the same K columns, in one dtype, with one eps: a fixed-size float64 header is
    all-gathered first (on the statistics' device, as NCCL needs), so a mismatch raises the same error on
    every rank (mismatched payload sizes would abort the process inside the collective, or hang it). The
    host must know before the payload's collective is sized, so this costs one host synchronization per
    synced forward."""
    header = torch.tensor([float(K), float(_DTYPE_CODES[dtype]), float(eps)], dtype=torch.float64, device=device)
    world = dist.get_world_size(_group(key))
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=_group(key))
    if bool(torch.stack(headers).eq(header).all()):
        return
    names = {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}
    shown = "; ".join(f"rank {r}: K = {int(h[0])}, {names[int(h[1])]}, eps = {float(h[2]):g}"
                      for r, h in enumerate(headers))
    raise ValueError(
        f"sync_stats=True pools batch statistics across ranks, so every rank must pass the same kept columns "
        f"(K), compute dtype and eps; they differ ({shown})"
    )


def merged_moments_fn(key: str, eps: float):
    """(count, c [K], m [K], M2 [K]) of this rank -> stats [5, K] over all ranks (see reference.py)."""

    def merge_and_finalize(count: int, shift: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        K = mean.shape[0]
        _check_ranks_agree(key, K, mean.dtype, eps, mean.device)
        payload = torch.cat([mean.new_full((1,), float(count)), shift, mean, m2])  # [1 + 3K]
        gathered = [torch.empty_like(payload) for _ in range(dist.get_world_size(_group(key)))]
        dist.all_gather(gathered, payload, group=_group(key))
        parts = [(p[0], p[1 : 1 + K], p[1 + K : 1 + 2 * K], p[1 + 2 * K :]) for p in gathered]  # rank order
        return finalize_moments(*merge_moments(parts, mean.dtype), eps)

    return merge_and_finalize


def sum_over_ranks_fn(key: str):
    """[2, K] gradient sums of this rank -> their sum over all ranks (a new tensor)."""

    def sum_over_ranks(sums: torch.Tensor) -> torch.Tensor:
        total = sums.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=_group(key))
        return total

    return sum_over_ranks
