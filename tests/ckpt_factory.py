"""Synthetic VQ-VAE checkpoints in the trainer's format, written into a test's tmp_path.

The masked-space statistics are drawn first (`Parts.mean_k`, `Parts.std_k`, [K]) and the per-category
arrays are slices of them through group_indices, so a test can compare what the loader assembles with
arrays it never assembled itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STATS_KEYS = {"standard": ("mean", "std"), "mad": ("median", "mad")}


@dataclass
class Parts:
    mask: np.ndarray  # [D] bool
    groups: dict[str, np.ndarray]  # category → kept-column indices (a partition of range(K))
    mean_k: np.ndarray  # [K] float64 (center: mean or median)
    std_k: np.ndarray  # [K] float64 (scale: std or mad), > 0
    method: str = "standard"
    extra: dict = field(default_factory=dict)

    @property
    def D(self) -> int:
        return int(self.mask.shape[0])

    @property
    def K(self) -> int:
        return int(self.mask.sum())

    def raw_stats(self, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """μ, σ over all D columns: the kept ones from mean_k/std_k, the dropped ones arbitrary."""
        rng = np.random.default_rng(seed)
        mean, std = rng.normal(size=self.D) * 50, rng.uniform(0.5, 3.0, size=self.D)
        mean[self.mask], std[self.mask] = self.mean_k, self.std_k
        return mean, std

    def per_category(self, dtype=np.float32) -> dict[str, dict[str, np.ndarray]]:
        """{category: {"mean","std"} or {"median","mad"}}, entry j ↔ kept column groups[category][j]."""
        c, s = STATS_KEYS[self.method]
        return {
            name: {c: self.mean_k[idx].astype(dtype), s: self.std_k[idx].astype(dtype)}
            for name, idx in self.groups.items()
        }


def make_parts(D: int = 187, K: int = 171, num_categories: int = 8, method: str = "standard", seed: int = 0,
               sizes: Optional[list[int]] = None) -> Parts:
    """A mask keeping K of D columns, categories partitioning the K kept columns, and float32-exact stats."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(D, dtype=bool)
    mask[np.sort(rng.choice(D, size=K, replace=False))] = True
    if sizes is None:
        cuts = np.sort(rng.choice(np.arange(1, K), size=num_categories - 1, replace=False))
        sizes = np.diff(np.concatenate([[0], cuts, [K]])).tolist()
    order = rng.permutation(K)  # real clusterings are not contiguous
    groups, start = {}, 0
    for i, n in enumerate(sizes):
        groups[f"cluster_{i + 1}"] = np.sort(order[start : start + n]).astype(np.int64)
        start += n
    assert start == K
    # Values representable in float32, so float32 storage loses nothing and comparisons can be exact.
    mean_k = (rng.normal(size=K) * 10 ** rng.uniform(-1, 2, size=K)).astype(np.float32).astype(np.float64)
    std_k = (10 ** rng.uniform(-1.5, 1.5, size=K)).astype(np.float32).astype(np.float64)
    return Parts(mask=mask, groups=groups, mean_k=mean_k, std_k=std_k, method=method)


def checkpoint_dict(parts: Parts, *, stats_in_file: bool = True) -> dict:
    """The dict a VQ-VAE trainer saves (numpy mask, model_config with input_dim and group_indices)."""
    ckpt = {
        "epoch": 12,
        "val_loss": np.float32(0.0123),
        "model_state_dict": {"decoder.weight": torch.randn(parts.K, 16), "decoder.bias": torch.zeros(parts.K)},
        "feature_mask": parts.mask.copy(),
        "model_config": {
            "input_dim": parts.K,
            "group_indices": {name: idx.tolist() for name, idx in parts.groups.items()},
            "group_embedding_dim": 16,
            "group_hidden_dim": 32,
        },
        "feature_names": [f"feature_{d}" for d in range(parts.D)],
        "config": {"epochs": 12, "normalization": parts.method, "seed": 0},
    }
    if stats_in_file:
        ckpt["normalization_stats"] = parts.per_category()
    ckpt.update(parts.extra)
    return ckpt


def write_npz(path: Path, per_category: dict[str, dict[str, np.ndarray]], method: Optional[str] = "standard") -> Path:
    """A normalization_stats.npz: {category}_{key} arrays and _normalization_method."""
    arrays = {f"{name}_{key}": value for name, entry in per_category.items() for key, value in entry.items()}
    if method is not None:
        arrays["_normalization_method"] = np.array([method])
    np.savez(path, **arrays)
    return path


def write_checkpoint(folder: Path, parts: Parts, *, stats_in_file: bool = True, stats_beside: bool = False,
                     name: str = "best_model.pt", edit=None) -> Path:
    """Write the checkpoint (and optionally normalization_stats.npz beside it); `edit(dict)` tampers first."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dict(parts, stats_in_file=stats_in_file)
    if edit is not None:
        edit(ckpt)
    path = folder / name
    torch.save(ckpt, path)
    if stats_beside:
        write_npz(folder / "normalization_stats.npz", parts.per_category(), parts.method)
    return path


def fixture_layout(arrays: dict, dropped: int, seed: int = 0) -> tuple[list, dict, np.ndarray, int]:
    """For a real statistics file's arrays: (categories, {category: kept columns} scattered over the K
    kept columns, a mask keeping K of K + dropped, K)."""
    categories = [k[: -len("_mean")] for k in arrays if k.endswith("_mean")]
    K = sum(arrays[f"{c}_mean"].size for c in categories)
    rng = np.random.default_rng(seed)
    order, groups, start = rng.permutation(K), {}, 0
    for c in categories:
        n = arrays[f"{c}_mean"].size
        groups[c] = np.sort(order[start : start + n])
        start += n
    mask = np.ones(K + dropped, dtype=bool)
    mask[rng.choice(K + dropped, size=dropped, replace=False)] = False
    return categories, groups, mask, K


def shared_dir() -> Path:
    """The shared data folder beside the repository (may be absent)."""
    return Path(__file__).resolve().parents[2] / "shared"


class Evil:
    """Unpickling this creates `marker`: the side effect a refused load must never have."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
