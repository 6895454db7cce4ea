"""The benchmark's problem: the cases (B, dtype, norm, mode), their inputs and byte counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch


D, K = 187, 171  # the motivating VQ-VAE: 171 of 187 feature columns kept
SIZES = (4, 64, 1024, 16384, 65536, 262144)
QUICK_SIZES = (4, 64, 1024, 16384, 65536)
DTYPES = ("float32", "bfloat16")
NORMS = ("stats", "batch")
# forward / forward+backward: the loss (masked_mse) alone; clean+mse: the VQ-led step's loss, z = the cleaned
# features (FeatureCleaner) and F.mse_loss(recon, z), forward+backward; columns: forward+backward of the
# per-column errors (reduction="column", [K]) through their mean, the plain fix's being
# F.mse_loss(z, r, reduction="none").mean(0).
MODES = ("forward", "forward+backward", "clean+mse", "columns")
VQ_STEP_SIZES = (4, 1024, 65536)  # the clean+mse cases that come right after the targets' in a run
PROVIDERS = ("fused", "reference", "eager", "compiled")
SEED = 0

# ---------------------------------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class Case:
    """One cell of the matrix, less the provider."""

    B: int
    dtype: str
    norm: str
    mode: str
    D: int = D
    K: int = K


def bytes_moved(case: Case) -> int:
    """The fewest bytes one step must move through memory: each pass reads its inputs once and writes its
    outputs once, and only the K kept columns of x are read. Forward: x's kept columns and r (norm="batch"
    reads x's kept columns twice: the column statistics, then the loss). Backward: x's kept columns and r
    again, then grad_x [B, D] (zeros in the dropped columns included) and grad_r [B, K].
    clean+mse: clean_features reads x's kept columns (twice for norm="batch") and writes z; F.mse_loss reads
    z and r; its backward reads them again and writes grad_z and grad_r; clean's backward reads grad_z and
    x's kept columns (both twice for norm="batch": the column sums, then the gradient) and writes grad_x."""
    e = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    kept = case.B * case.K * e
    passes = 2 if case.norm == "batch" else 1
    grad_x = case.B * case.D * e
    if case.mode == "clean+mse":
        return (passes * kept + kept) + 2 * kept + 4 * kept + (2 * passes * kept + grad_x)
    forward = kept * passes + kept + (case.K * e if case.mode == "columns" else e)
    if case.mode == "forward":
        return forward
    return forward + 2 * kept + grad_x + kept


@dataclass
class Inputs:
    mask: torch.Tensor  # [D] bool
    mean: torch.Tensor  # [D] float32
    std: torch.Tensor  # [D] float32
    x: torch.Tensor  # [B, D]
    r: torch.Tensor  # [B, K]


def make_statistics(device: str, d: int = D, k: int = K, seed: int = SEED):
    """(mask keeping k of d columns, mean [d], std [d]): the frozen VQ-VAE's side, the same for every B."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(d, dtype=torch.bool)
    mask[torch.randperm(d, generator=g)[:k]] = True
    mean = torch.randn(d, generator=g) * 2
    std = torch.rand(d, generator=g) * 2 + 0.25
    return mask.to(device), mean.to(device), std.to(device)


def make_inputs(case: Case, device: str, seed: int = SEED) -> Inputs:
    mask, mean, std = make_statistics(device, case.D, case.K, seed)
    g = torch.Generator(device=device).manual_seed(seed + case.B)
    dtype = getattr(torch, case.dtype)
    x = (torch.randn(case.B, case.D, generator=g, device=device) * std + mean).to(dtype).requires_grad_()
    r = torch.randn(case.B, case.K, generator=g, device=device).to(dtype).requires_grad_()
    return Inputs(mask, mean, std, x, r)
