"""The hybrid VQ-led step of `fusedvq demo --checkpoint PATH` when PATH is a hybrid VQ-VAE (docs/hybrid.md):

    u = model(tokens)                                    # the latent
    features, emb = extractor(u), initial_encoder(u)     # [B, D]; [B, c]: the stand-in initial encoder
    z = cleaner(features)                                # [B, K]
    recon, commitment = vq(cleaner.combine(z, emb))      # [B, K + c]: embeddings at decoder columns p..p+c-1
    columns = cleaner.recon_loss(recon, z, "column", embeddings=emb)   # [K + c], decoder order
    loss = columns.mean() + λ·commitment                 # = F.mse_loss(recon, combine(z, emb)) + λ·commitment

The VQ-VAE is fitted to the combined input, grouped by the decoder's categories (model_config's
group_indices: the INITIAL category holds its embedding columns), and the per-category errors are the
means of the [K + c] column errors over those decoder columns, as the trainer's
`{category}/reconstruction_mse` counts them: computed here, on the device, from the column errors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .world import COMMITMENT, LATENT, SAMPLES, World, build_extractor, clean_sample, fit_vq


class InitialEncoder(nn.Module):
    """Fixed stand-in for a hybrid VQ-VAE's initial encoder: latent u [B, LATENT] → embeddings [B, c] =
    tanh(u @ W), inserted at decoder column gap_at (p)."""

    def __init__(self, W: torch.Tensor, gap_at: int):
        super().__init__()
        self.register_buffer("W", W)  # [LATENT, c]
        self.gap_at = gap_at

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tanh(u @ self.W)


def hybrid_world(spec, mean: torch.Tensor, std: torch.Tensor, categories: Optional[dict],
                 gen: torch.Generator) -> World:
    """An extractor of the spec's widths, a stand-in initial encoder of its c embedding columns, and a
    VQ-VAE over the K + c decoder columns fitted to their combination."""
    K, p, c = spec.num_kept, spec.hybrid.gap_at, spec.hybrid.gap_width
    mask = spec.feature_mask
    extractor = build_extractor(mask, mean, std, gen)
    initial = InitialEncoder(torch.randn(LATENT, c, generator=gen, dtype=torch.float64) / math.sqrt(LATENT), p)
    with torch.no_grad():
        u = torch.randn(SAMPLES, LATENT, generator=gen, dtype=torch.float64)
        z = clean_sample(extractor(u)[:, mask])
        sample = torch.cat([z[:, :p], initial(u), z[:, p:]], 1)
    vq = fit_vq(sample, categories or {"all": list(range(K + c))})
    return World(mask, mean, std, categories or {}, extractor.float(), vq, initial.float())


def hybrid_loss(world: World, u: torch.Tensor, z: torch.Tensor, cleaner=None):
    """(loss, the per-column errors [K + c] when cleaner is given, else None). Without a cleaner, the plain
    fix: the combined input by torch.cat and F.mse_loss over it."""
    emb = world.initial(u)
    if cleaner is None:
        p = world.initial.gap_at
        combined = torch.cat([z[:, :p], emb, z[:, p:]], 1)
        recon, commitment = world.vq(combined)
        return F.mse_loss(recon, combined) + COMMITMENT * commitment, None
    recon, commitment = world.vq(cleaner.combine(z, emb))
    columns = cleaner.recon_loss(recon, z, reduction="column", embeddings=emb)  # its mean: the objective
    return columns.mean() + COMMITMENT * commitment, columns


def objective_check(world: World, cleaner, u64: torch.Tensor, z_fused: torch.Tensor, z_plain: torch.Tensor) -> str:
    """The hybrid objective, recon_loss with the embeddings, against F.mse_loss over torch.cat's combined
    input (the trainer's), in float64 on the CPU with the same reconstruction."""
    import copy

    initial, vq = (copy.deepcopy(m).double().cpu() for m in (world.initial, world.vq))
    with torch.no_grad():
        emb = initial(u64)
        recon, _ = vq(cleaner.combine(z_fused, emb))
        fused = cleaner.recon_loss(recon, z_fused, embeddings=emb)
        p = initial.gap_at
        plain = F.mse_loss(recon, torch.cat([z_plain[:, :p], emb, z_plain[:, p:]], 1))
    rel = float((fused - plain).abs() / plain.abs().clamp_min(1e-30))
    return (f"check: the hybrid objective recon_loss(recon, z, embeddings=emb) vs F.mse_loss(recon, "
            f"torch.cat([z[:, :p], emb, z[:, p:]], 1)) over all {recon.shape[1]} decoder columns in float64: "
            f"relative difference {rel:.1e}")
