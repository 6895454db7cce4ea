"""Synthetic VQ-VAE checkpoints written into a test's tmp_path: the tests' one checkpoint factory.

A `Run` holds one trained VQ-VAE's pieces, drawn so that a test knows every placement independently (mask,
categories over the kept columns, statistics per kept column: float64 of float32 values, so that storage
loses nothing and comparisons can be exact), saved as its trainer saves it: a plain trainer's dict
(`make_plain_run`), or the dict of the project that motivated fusedvq (`make_run`, from its published code:
statistics as objects of its trainer's classes, stand-ins importable only while torch.save runs, so the
loader meets them unimportable as it would the real ones; families, the hybrid one "initial_hybrid", its
decoder K + c wide; a normalization_stats.npz beside it). And docs/hybrid.md's minimal hybrid checkpoint.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STATS_KEYS = {"standard": ("mean", "std"), "mad": ("median", "mad")}
MODULE = "spinlock.encoding.normalization"


@dataclass
class NormalizationStats:
    mean: np.ndarray
    std: np.ndarray


@dataclass
class RobustNormalizationStats:
    median: np.ndarray
    mad: np.ndarray


NormalizationStats.__module__ = RobustNormalizationStats.__module__ = MODULE


@dataclass
class Run:
    mask: np.ndarray  # [D] bool
    groups: dict  # category → kept-column indices (a partition of range(K)), in its statistics' order
    mean_k: np.ndarray  # [K] float64 of float32 values (center: mean or median)
    std_k: np.ndarray  # [K] (scale: std or mad), > 0
    method: str = "standard"
    families: Optional[dict] = None  # the motivating project's runs: family → width in the original columns
    hybrid_family: Optional[str] = None  # the family encoded by initial_hybrid
    gap_width: int = 0  # c

    @property
    def D(self) -> int:
        return int(self.mask.shape[0])

    @property
    def K(self) -> int:
        return int(self.mask.sum())

    @property
    def gap_at(self) -> int:
        """p: kept columns up to and including the hybrid family's."""
        start = 0
        for name, width in self.families.items():
            start += width
            if name == self.hybrid_family:
                return int(self.mask[:start].sum())
        raise ValueError("not hybrid")

    def raw_stats(self, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """μ, σ over all D columns: the kept ones from mean_k/std_k, the dropped ones arbitrary."""
        rng = np.random.default_rng(seed)
        mean, std = rng.normal(size=self.D) * 50, rng.uniform(0.5, 3.0, size=self.D)
        mean[self.mask], std[self.mask] = self.mean_k, self.std_k
        return mean, std

    def per_category(self, dtype=np.float32) -> dict[str, dict[str, np.ndarray]]:
        """{category: {"mean","std"} or {"median","mad"}}, entry j ↔ kept column groups[category][j]."""
        c, s = STATS_KEYS[self.method]
        return {name: {c: self.mean_k[idx].astype(dtype), s: self.std_k[idx].astype(dtype)}
                for name, idx in self.groups.items()}

    def decoder_groups(self) -> dict:
        """model_config's group_indices: shifted past the embedding columns, which join the category
        holding the hybrid family's columns (as a sorted set)."""
        if self.hybrid_family is None:
            return {n: list(map(int, g)) for n, g in self.groups.items()}
        p, c = self.gap_at, self.gap_width
        out = {n: [int(i) if i < p else int(i) + c for i in g] for n, g in self.groups.items()}
        initial_cols = set(range(p - self.families[self.hybrid_family], p))
        owner = next(n for n, g in self.groups.items() if initial_cols & set(map(int, g)))
        out[owner] = sorted(set(out[owner]) | set(range(p, p + c)))
        return out


def make_plain_run(D: int = 187, K: int = 171, num_categories: int = 8, method: str = "standard", seed: int = 0,
                   sizes: Optional[list[int]] = None) -> Run:
    """A plain trainer's run: a mask keeping K of D columns, categories partitioning the K kept columns (each
    sorted), float32-exact statistics."""
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
    mean_k = (rng.normal(size=K) * 10 ** rng.uniform(-1, 2, size=K)).astype(np.float32).astype(np.float64)
    std_k = (10 ** rng.uniform(-1.5, 1.5, size=K)).astype(np.float32).astype(np.float64)
    return Run(mask=mask, groups=groups, mean_k=mean_k, std_k=std_k, method=method)


def make_run(*, hybrid: bool, method: str = "standard", seed: int = 0, families=None, gap_width: int = 28,
             num_categories: int = 6) -> Run:
    """A run of the motivating project's trainer: families of columns (the hybrid family's always kept), each
    category's statistics in an order of its own."""
    rng = np.random.default_rng(seed)
    families = dict(families or {"summary": 128, "initial": 14, "temporal": 128})
    mask = rng.random(sum(families.values())) < 0.55
    start = 0
    for name, width in families.items():  # the hybrid family's columns are protected from cleaning
        if hybrid and name == "initial":
            mask[start : start + width] = True
        start += width
    K = int(mask.sum())
    run = Run(mask=mask, groups={}, mean_k=np.full(K, np.nan), std_k=np.full(K, np.nan), method=method,
              families=families, hybrid_family="initial" if hybrid else None, gap_width=gap_width * hybrid)
    order = rng.permutation(K)
    cuts = np.sort(rng.choice(np.arange(1, K), size=num_categories - 1, replace=False))
    for i, part in enumerate(np.split(order, cuts)):
        idx = run.groups[f"cluster_{i + 1}"] = rng.permutation(part)
        run.mean_k[idx] = (rng.normal(size=part.size) * 10 ** rng.uniform(-1, 3, size=part.size)).astype(np.float32)
        run.std_k[idx] = (10 ** rng.uniform(-2, 2, size=part.size)).astype(np.float32)
    return run


def checkpoint_dict(run: Run, *, stats_in_file: bool = True) -> dict:
    """The dict the run's trainer saves."""
    if run.families is not None:
        return _project_dict(run)
    ckpt = {
        "epoch": 12,
        "val_loss": np.float32(0.0123),
        "model_state_dict": {"decoder.weight": torch.randn(run.K, 16), "decoder.bias": torch.zeros(run.K)},
        "feature_mask": run.mask.copy(),
        "model_config": {"input_dim": run.K, "group_indices": {n: idx.tolist() for n, idx in run.groups.items()},
                         "group_embedding_dim": 16, "group_hidden_dim": 32},
        "feature_names": [f"feature_{d}" for d in range(run.D)],
        "config": {"epochs": 12, "normalization": run.method, "seed": 0},
    }
    if stats_in_file:
        ckpt["normalization_stats"] = run.per_category()
    return ckpt


def _project_dict(run: Run) -> dict:
    cls = NormalizationStats if run.method == "standard" else RobustNormalizationStats
    fams = {name: {"encoder": "initial_hybrid", "encoder_params": {"cnn_embedding_dim": run.gap_width}}
            if name == run.hybrid_family else {"encoder": "mlp", "encoder_params": {"hidden_dims": [256],
                                                                                   "output_dim": 128}}
            for name in run.families}
    width = run.K + run.gap_width
    state = {"vqvae.shared_decoder.0.weight": torch.randn(64, 32),
             "vqvae.shared_decoder.2.weight": torch.randn(width, 64)}
    if run.hybrid_family:
        c = run.gap_width
        state.update({"initial_encoder.cnn_encoder.stage1.0.weight": torch.randn(32, 1, 7, 7),
                      "initial_encoder.cnn_encoder.fc.weight": torch.randn(c, 256),
                      "initial_encoder.cnn_encoder.fc.bias": torch.randn(c),
                      "initial_encoder.cnn_encoder.bn_final.weight": torch.ones(c)})
    names, start = [], 0
    for name, w in run.families.items():
        names += [f"{name}::{name}_{i}" for i in range(w) if run.mask[start + i]]
        start += w
    return {
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "pre_model_group_indices": {n: list(map(int, g)) for n, g in run.groups.items()},
        "normalization_stats": {n: cls(*entry.values()) for n, entry in run.per_category().items()},
        "feature_names": names,
        "config": {"families": fams, "output_dir": pathlib.PosixPath("/runs/vqvae/v1"),
                   "checkpoint_dir": pathlib.PosixPath("/runs/vqvae/v1/checkpoints"),
                   "normalization_method": run.method, "learning_rate": 1e-3, "batch_size": 512},
        "history": {"val_loss": [0.5, 0.3], "utilization": [np.float64(0.4)]},
        "encoder_state_dicts": {"summary": {"encoder_name": "mlp", "encoder_params": {}, "state_dict": {}}},
        "feature_mask": run.mask.copy(),
        "feature_cleaning_params": {"variance_threshold": 1e-10, "percentile_range": [0.5, 99.5]},
        "prng_states": {"random_seed": 42, "torch_rng_state": torch.get_rng_state(),
                        "numpy_rng_state": np.random.get_state(), "python_rng_state": random.getstate()},
        "model_config": {"input_dim": width, "group_indices": run.decoder_groups(), "group_embedding_dim": 64,
                         "group_hidden_dim": 128},
        "metrics": {"val_loss": np.float32(0.3)},
    }


@contextlib.contextmanager
def trainer_classes(**extra):
    """The motivating project's trainer modules, importable only inside the block (extra: more names in it)."""
    names = ("spinlock", "spinlock.encoding", MODULE)
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(MODULE)
    module.NormalizationStats, module.RobustNormalizationStats = NormalizationStats, RobustNormalizationStats
    for key, value in extra.items():
        setattr(module, key, value)
        value.__module__ = MODULE
    sys.modules.update({"spinlock": types.ModuleType("spinlock"), MODULE: module,
                        "spinlock.encoding": types.ModuleType("spinlock.encoding")})
    try:
        yield module
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_npz(path: Path, per_category: dict[str, dict[str, np.ndarray]], method: Optional[str] = "standard") -> Path:
    """A normalization_stats.npz: {category}_{key} arrays and _normalization_method."""
    arrays = {f"{name}_{key}": value for name, entry in per_category.items() for key, value in entry.items()}
    if method is not None:
        arrays["_normalization_method"] = np.array([method])
    np.savez(path, **arrays)
    return path


def write_checkpoint(folder: Path, run: Run, *, stats_in_file: bool = True, stats_beside: Optional[bool] = None,
                     name: str = "best_model.pt", edit=None) -> Path:
    """Write the checkpoint, and normalization_stats.npz beside it if stats_beside (by default as the run's
    trainer does: the motivating project's writes it, a plain trainer does not); `edit(dict)` tampers first."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dict(run, stats_in_file=stats_in_file)
    if edit is not None:
        edit(ckpt)
    with trainer_classes() if run.families is not None else contextlib.nullcontext():
        torch.save(ckpt, folder / name)
    if stats_beside or stats_beside is None and run.families is not None:
        write_npz(folder / "normalization_stats.npz", run.per_category(), run.method)
    return folder / name


def write_minimal_hybrid(path: Path, c: int = 3) -> Path:
    """docs/hybrid.md's minimal hybrid checkpoint: 20 extractor columns, 16 kept, c embedding columns after
    the 'initial' family's (decoder columns 8 .. 8 + c - 1, in the 'initial' category)."""
    mask = np.ones(20, dtype=bool)
    mask[[1, 3, 12, 15]] = False
    kept = {"summary": [0, 1, 2, 3], "initial": [4, 5, 6, 7], "temporal": list(range(8, 16))}
    decoder = {"summary": [0, 1, 2, 3], "initial": list(range(4, 8 + c)), "temporal": [k + c for k in range(8, 16)]}
    names = [f"{family}::{family}_{i}" for family, n in (("summary", 4), ("initial", 4), ("temporal", 8))
             for i in range(n)]
    torch.save({
        "feature_mask": mask, "feature_names": names, "pre_model_group_indices": kept,
        "model_config": {"input_dim": 16 + c, "group_indices": decoder},
        "model_state_dict": {"initial_encoder.fc.weight": torch.zeros(c, 8), "initial_encoder.fc.bias": torch.zeros(c)},
        "config": {"families": {"initial": {"encoder": "initial_hybrid", "encoder_params": {"cnn_embedding_dim": c}}}},
        "normalization_stats": {n: {"mean": np.zeros(len(i)), "std": np.ones(len(i))} for n, i in kept.items()},
    }, path)  # fmt: skip
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
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))
