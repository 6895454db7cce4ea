"""Checkpoints in the save format of the project that motivated fusedvq (its VQ-VAE trainer's torch.save
dict), built from the structure of its published code, written into a test's tmp_path.

What the format holds (and so what these files hold):
    normalization_stats   {category: NormalizationStats(mean, std)} or RobustNormalizationStats(median, mad),
                          pickled objects of the trainer's own classes (spinlock.encoding.normalization)
    config                the raw training config: families (the hybrid one encoded by "initial_hybrid"),
                          PosixPath entries, numbers
    pre_model_group_indices  categories in kept feature columns (the statistics' order)
    model_config          input_dim and group_indices of the decoder: for a hybrid model K + c wide, the
                          indices after the INITIAL family shifted by c and the INITIAL category grown by the
                          c embedding columns
    model_state_dict      with initial_encoder.* entries for a hybrid model
    feature_mask          bool over the original columns (INITIAL columns always kept)
    feature_names, feature_cleaning_params, metrics, prng_states, ...
and a normalization_stats.npz beside it ({category}_{mean|std|median|mad}, _normalization_method).

The trainer's classes are stand-ins with the same module and class names, registered in sys.modules only
while torch.save runs, so the loader meets them exactly as it would meet the real ones: unimportable.
"""

from __future__ import annotations

import contextlib
import pathlib
import random
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

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


@contextlib.contextmanager
def trainer_classes(**extra):
    """The trainer's modules, importable only inside the block (extra: more names in the module)."""
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


@dataclass
class Run:
    """One trained VQ-VAE's pieces, drawn so that a test knows every placement independently."""

    mask: np.ndarray  # [D0] bool
    kept_groups: dict  # category → kept-column indices (the statistics' order)
    center: dict  # category → float32 [n]
    scale: dict  # category → float32 [n]
    method: str  # "standard" | "mad"
    families: dict  # name → width in the original columns, in order
    hybrid_family: Optional[str] = None  # the family encoded by initial_hybrid
    gap_width: int = 0  # c
    extra: dict = field(default_factory=dict)

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

    def expected_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """What the trainer's own normalization puts on each kept column: entry j of a category's arrays on
        kept column kept_groups[category][j] (float32, as stored)."""
        mu, sigma = np.full(self.K, np.nan, np.float32), np.full(self.K, np.nan, np.float32)
        for name, cols in self.kept_groups.items():
            for j, col in enumerate(cols):
                mu[col], sigma[col] = self.center[name][j], self.scale[name][j]
        return mu, sigma

    def decoder_groups(self) -> dict:
        """model_config's group_indices: shifted past the embedding columns, which join the category
        holding the hybrid family's columns (as a sorted set)."""
        if self.hybrid_family is None:
            return {n: list(map(int, g)) for n, g in self.kept_groups.items()}
        p, c = self.gap_at, self.gap_width
        out = {n: [int(i) if i < p else int(i) + c for i in g] for n, g in self.kept_groups.items()}
        initial_cols = set(range(p - self.families[self.hybrid_family], p))
        owner = next(n for n, g in self.kept_groups.items() if initial_cols & set(map(int, g)))
        out[owner] = sorted(set(out[owner]) | set(range(p, p + c)))
        return out


def make_run(*, hybrid: bool, method: str = "standard", seed: int = 0, families=None, gap_width: int = 28,
             num_categories: int = 6) -> Run:
    rng = np.random.default_rng(seed)
    families = dict(families or {"summary": 128, "initial": 14, "temporal": 128})
    D0 = sum(families.values())
    mask = rng.random(D0) < 0.55
    start = 0
    for name, width in families.items():  # the hybrid family's columns are protected from cleaning
        if hybrid and name == "initial":
            mask[start : start + width] = True
        start += width
    K = int(mask.sum())
    run = Run(mask=mask, kept_groups={}, center={}, scale={}, method=method, families=families,
              hybrid_family="initial" if hybrid else None, gap_width=gap_width if hybrid else 0)
    order = rng.permutation(K)
    cuts = np.sort(rng.choice(np.arange(1, K), size=num_categories - 1, replace=False))
    for i, part in enumerate(np.split(order, cuts)):
        name = f"cluster_{i + 1}"
        run.kept_groups[name] = rng.permutation(part)  # the order of a category's statistics is its own
        n = part.size
        run.center[name] = (rng.normal(size=n) * 10 ** rng.uniform(-1, 3, size=n)).astype(np.float32)
        run.scale[name] = (10 ** rng.uniform(-2, 2, size=n)).astype(np.float32)
    return run


def checkpoint_dict(run: Run) -> dict:
    cls = NormalizationStats if run.method == "standard" else RobustNormalizationStats
    stats = {n: cls(run.center[n], run.scale[n]) for n in run.kept_groups}
    fams = {}
    for name in run.families:
        if name == run.hybrid_family:
            fams[name] = {"encoder": "initial_hybrid", "encoder_params": {"cnn_embedding_dim": run.gap_width}}
        else:
            fams[name] = {"encoder": "mlp", "encoder_params": {"hidden_dims": [256], "output_dim": 128}}
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
        "pre_model_group_indices": {n: list(map(int, g)) for n, g in run.kept_groups.items()},
        "normalization_stats": stats,
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
        **run.extra,
    }


def write_npz(path: Path, run: Run) -> Path:
    keys = ("mean", "std") if run.method == "standard" else ("median", "mad")
    arrays = {}
    for n in run.kept_groups:
        arrays[f"{n}_{keys[0]}"], arrays[f"{n}_{keys[1]}"] = run.center[n], run.scale[n]
    arrays["_normalization_method"] = np.array([run.method])
    np.savez(path, **arrays)
    return path


def write_run(folder: Path, run: Run, *, npz: bool = True, edit=None, name: str = "best_model.pt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_dict(run)
    if edit is not None:
        edit(ckpt)
    with trainer_classes():
        torch.save(ckpt, folder / name)
    if npz:
        write_npz(folder / "normalization_stats.npz", run)
    return folder / name


__all__ = ["NormalizationStats", "RobustNormalizationStats", "Run", "make_run", "checkpoint_dict", "write_npz",
           "write_run", "trainer_classes"]
