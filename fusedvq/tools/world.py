"""The built-in world of `fusedvq demo`, generated deterministically (no downloads), shaped like the
motivating project's VQ-led training:

    token c ──model (trained)──► latent u [B, 24] ──feature extractor (fixed)──► features [B, 187]
    features ──FeatureCleaner(mask, norm="batch", nan_to_num=True)──► z [B, 171]
    z ──frozen grouped encoder (reads z[:, group_indices[g]])──► h ──quantize (straight-through)──► q
    q ──frozen decoder──► recon [B, 171];   loss = F.mse_loss(recon, z) + λ·commitment

The VQ-VAE is a per-category linear autoencoder with a codebook per category, fitted to the extractor: each
category's encoder projects its kept columns onto the directions the extractor's features span there, so
a model can drive the loss down by learning latents whose cleaned features the VQ-VAE reconstructs. Like a
real one it under-fits somewhere: the smallest category keeps one direction only, so its error stays high
while the mean over all columns, dominated by the others, falls (the demo's per-category lines show it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

SEED = 20240607
FEATURES, KEPT = 187, 171
CATEGORY_SIZES = (24, 18, 30, 12, 27, 21, 15, 24)  # sums to 171, like a clustering of the kept columns
NUM_TOKENS, LATENT, CODE_DIM, NUM_CODES, SAMPLES = 256, 8, 8, 64, 4096
COMMITMENT = 0.25  # λ, the commitment term's weight in the step's loss


class FeatureExtractor(nn.Module):
    """Fixed, differentiable: latent u [B, U] → features [B, D] = offset + scale · tanh(u @ A).

    Dropped columns have scale 0 (constant: the reason cleaning dropped them); kept columns have scales
    over 4 decades, so normalization matters."""

    def __init__(self, A: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)  # [U, D]
        self.register_buffer("offset", offset)  # [D]
        self.register_buffer("scale", scale)  # [D]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.offset, self.scale, torch.tanh(u @ self.A))


class GroupedVQ(nn.Module):
    """The frozen VQ-VAE: per category g, h_g = z[:, idx_g] @ E_g, q_g = the nearest of its codes (with a
    straight-through gradient), recon[:, idx_g] = q_g @ E_gᵀ. Like the motivating project's grouped
    encoder it selects its inputs by index and never checks the width it is given."""

    def __init__(self, groups: dict[str, list[int]], bases: list[torch.Tensor], codebooks: list[torch.Tensor],
                 num_kept: int):
        super().__init__()
        self.names = list(groups)
        self.num_kept = num_kept
        for i, name in enumerate(self.names):
            self.register_buffer(f"idx_{i}", torch.tensor(groups[name], dtype=torch.long))
            self.register_buffer(f"basis_{i}", bases[i])  # [n_g, CODE_DIM], orthonormal columns
            self.register_buffer(f"codes_{i}", codebooks[i])  # [NUM_CODES, CODE_DIM]

    def parts(self):
        for i in range(len(self.names)):
            yield getattr(self, f"idx_{i}"), getattr(self, f"basis_{i}"), getattr(self, f"codes_{i}")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(recon [B, K], commitment = mean ‖h − sg(q)‖²)."""
        recon = z.new_zeros((z.shape[0], self.num_kept))
        commitment = z.new_zeros(())
        for idx, basis, codes in self.parts():
            h = z[:, idx] @ basis  # the encoder: reads the columns it was built for, by index
            q = codes[torch.cdist(h.detach(), codes).argmin(1)]
            commitment = commitment + (h - q).square().mean()
            q = h + (q - h).detach()  # straight-through estimator
            recon = recon.index_add(1, idx, q @ basis.T)
        return recon, commitment / len(self.names)


def make_model() -> nn.Sequential:
    """The model being trained: token → latent [B, LATENT] that the extractor turns into features."""
    return nn.Sequential(nn.Embedding(NUM_TOKENS, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, LATENT))


@dataclass
class World:
    mask: torch.Tensor  # [D] bool
    mean_k: torch.Tensor  # [K] float64: the VQ-VAE's statistics of the kept columns (saved with it)
    std_k: torch.Tensor  # [K] float64
    categories: dict[str, list[int]]
    extractor: FeatureExtractor
    vq: GroupedVQ  # over the decoder's columns (hybrid: K + c, grouped by the decoder's categories)
    initial: Optional[nn.Module] = None  # a hybrid's stand-in initial encoder (hybrid_step.py), else None


def default_spec(gen: torch.Generator):
    """The built-in VQ-VAE's mask [187] (16 dropped), statistics [171] and categories."""
    mask = torch.ones(FEATURES, dtype=torch.bool)
    mask[torch.randperm(FEATURES, generator=gen)[: FEATURES - KEPT]] = False
    scales = 10 ** (torch.rand(KEPT, generator=gen, dtype=torch.float64) * 4 - 2)  # 0.01 … 100
    mean_k = torch.randn(KEPT, generator=gen, dtype=torch.float64) * scales * 3
    order = torch.randperm(KEPT, generator=gen).tolist()
    categories, start = {}, 0
    for i, n in enumerate(CATEGORY_SIZES):
        categories[f"cluster_{i + 1}"] = sorted(order[start : start + n])
        start += n
    return mask, mean_k, scales, categories


def build_world(mask, mean_k, std_k, categories: dict, gen: torch.Generator) -> World:
    """An extractor matched to the statistics, and a VQ-VAE fitted to what it produces."""
    extractor = build_extractor(mask, mean_k, std_k, gen)
    # The VQ-VAE "trained" on the extractor's output: the cleaned features of SAMPLES random latents.
    with torch.no_grad():
        z = clean_sample(extractor(torch.randn(SAMPLES, LATENT, generator=gen, dtype=torch.float64))[:, mask])
    vq = fit_vq(z, categories)
    return World(mask, mean_k, std_k, categories, extractor.float(), vq)


def build_extractor(mask, mean_k, std_k, gen: torch.Generator) -> FeatureExtractor:
    """A float64 extractor whose kept columns have the statistics' means and scales (dropped: constants)."""
    D = mask.shape[0]
    A = torch.randn(LATENT, D, generator=gen, dtype=torch.float64) / math.sqrt(LATENT)
    A[:, ~mask] = 0.0
    offset = torch.randn(D, generator=gen, dtype=torch.float64)  # dropped columns: constants
    scale = torch.zeros(D, dtype=torch.float64)
    offset[mask], scale[mask] = mean_k, std_k / 0.63  # tanh of a unit normal has std ≈ 0.63
    return FeatureExtractor(A, offset, scale)


def clean_sample(kept: torch.Tensor) -> torch.Tensor:
    """A sample's kept columns normalized by its own statistics (what the VQ-VAE was trained on)."""
    return (kept - kept.mean(0)) / kept.std(0).clamp_min(1e-8)


def fit_vq(sample: torch.Tensor, categories: dict) -> GroupedVQ:
    """The VQ-VAE fitted to a float64 sample of its input [SAMPLES, W] (W columns, grouped by categories):
    per category the top CODE_DIM principal directions, and as codes the projections of NUM_CODES of the
    samples (all categories from the same latents, so a latent exists that every category reconstructs)."""
    bases, codebooks = [], []
    smallest = min(categories, key=lambda name: len(categories[name]))
    for name, idx in categories.items():
        _, _, vh = torch.linalg.svd(sample[:, idx], full_matrices=False)
        n = 1 if name == smallest and len(categories) > 1 else min(CODE_DIM, len(idx))  # the under-fitted one
        basis = torch.zeros(len(idx), CODE_DIM, dtype=torch.float64)
        basis[:, :n] = vh[:n].T
        bases.append(basis.float())
        codebooks.append((sample[:NUM_CODES, idx] @ basis).float())
    return GroupedVQ(categories, bases, codebooks, sample.shape[1])


def write_checkpoint(world: World, folder: Path) -> Path:
    """The VQ-VAE's part of the world in the trainer's format (what FeatureCleaner.from_checkpoint reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    std_np, mean_np = world.std_k.numpy(), world.mean_k.numpy()
    path = folder / "best_model.pt"
    torch.save(
        {
            "feature_mask": world.mask.numpy().copy(),
            "model_config": {"input_dim": int(world.mask.sum()), "group_indices": world.categories,
                             "codebook_size": NUM_CODES, "embedding_dim": CODE_DIM},
            "normalization_stats": {
                name: {"mean": mean_np[idx].astype(np.float32), "std": std_np[idx].astype(np.float32)}
                for name, idx in world.categories.items()
            },
            "feature_names": [f"feature_{d}" for d in range(world.mask.shape[0])],
            "model_state_dict": {f"vq.{k}": v for k, v in world.vq.state_dict().items()},
            "config": {"generator": "fusedvq demo", "seed": SEED},
        },
        path,
    )  # fmt: skip
    return path
