"""What `fusedvq demo` shows beside training: what goes wrong without fusedvq at the checkpoint's widths,
its cleaned features (and a hybrid's objective) against the plain fix in float64, and the step timed
against the plain fix."""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from .hybrid_step import objective_check
from .world import World


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_clean(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The plain fix: nan_to_num → mean → unbiased std (σ < eps → 1) → normalize → nan_to_num → x[:, mask]."""
    x = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
    std = x.std(0)
    z = (x - x.mean(0)) / torch.where(std < eps, torch.ones_like(std), std)
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)[:, mask]


def pitfalls(world: World, cleaner, device: torch.device) -> list[str]:
    """What goes wrong without fusedvq at these widths, and what fusedvq says instead."""
    D, K = cleaner.num_features, cleaner.num_kept
    mask = cleaner_mask(cleaner)
    features = torch.randn(8, D, device=device)
    recon = torch.randn(8, world.vq.num_kept, device=device)  # the decoder's width (hybrid: K + c)
    lines = []
    try:
        with warnings.catch_warnings():  # its broadcasting warning is beside the point: it is about to fail
            warnings.simplefilter("ignore")
            F.mse_loss(recon, features)  # the naive loss: the reconstruction against all D feature columns
        lines.append("  naive loss  F.mse_loss(recon, normalize(features)) ran: the decoder's width is D here")
    except RuntimeError as err:
        lines.append(f"  naive loss  F.mse_loss(recon, normalize(features)) -> RuntimeError: {str(err).splitlines()[0]}")
    if D > K and world.initial is None:  # (a hybrid's encoder reads the K + c combined columns)
        world.vq(features)  # runs: the grouped encoder reads by index and never checks the width
        kept = mask.nonzero().squeeze(1).cpu()
        right = int((kept == torch.arange(K)).sum())
        lines.append(f"  encoder     fed the raw [B, {D}] features, it ran without an error and read the wrong "
                     f"column at {K - right} of its {K} inputs")
    try:
        cleaner(torch.randn(8, K, device=device))
    except ValueError as err:
        lines.append(f"  fusedvq     FeatureCleaner given {K}-column features -> ValueError: {err}")
    return lines


def cleaner_mask(cleaner) -> torch.Tensor:
    """The bool mask [D] of a FeatureCleaner built from a mask."""
    mask = torch.zeros(cleaner.num_features, dtype=torch.bool, device=cleaner.index.device)
    mask[cleaner.index] = True
    return mask


def parity_lines(world: World, model, cleaner, tokens) -> list[str]:
    """The last batch's cleaned features, FeatureCleaner against the plain fix, both in float64 (and a
    hybrid's objective against F.mse_loss over the combined input)."""
    with torch.no_grad():
        latent = model(tokens)
        features, u = world.extractor(latent).double().cpu(), latent.double().cpu()
    mask = cleaner_mask(cleaner).cpu()
    cleaner.cpu()  # (float64: the reference path)
    try:
        z_fused = cleaner(features)
        z_plain = plain_clean(features, mask)
        rel = float((z_fused - z_plain).norm() / z_plain.norm().clamp_min(1e-30))
        lines = [f"check: FeatureCleaner's z vs the plain fix (nan_to_num, mean, std, σ<eps→1, normalize, "
                 f"nan_to_num, x[:, mask]) in float64: relative difference {rel:.1e}"]
        if world.initial is not None:
            lines.append(objective_check(world, cleaner, u, z_fused, z_plain))
    finally:
        cleaner.to(tokens.device)
    return lines


def timing_line(step_loss, model, cleaner, tokens, device: torch.device, rounds: int = 5) -> str:
    """The whole training step (forward + backward) on the last batch: FeatureCleaner against the plain
    fix, in alternating rounds (the same minutes of the same machine): the median per step, the fastest and
    slowest rounds, and which is faster, or that the rounds spread too wide to say (as `fusedvq bench`).
    step_loss(clean, fused) → the loss (fused: with the cleaner's loss where the step has one)."""
    from .benchmark import NOISY, NOISY_SPREAD, speed_words

    mask = cleaner_mask(cleaner)
    params = list(model.parameters())

    def step(clean, fused):
        torch.autograd.grad(step_loss(clean, fused), params)

    steps = {"fusedvq": lambda: step(cleaner, True), "plain": lambda: step(lambda f: plain_clean(f, mask), False)}
    times = {name: [] for name in steps}
    repeats = 20
    for _ in range(rounds):
        for name, fn in steps.items():
            fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / repeats * 1e3)
    fused, plain = (sorted(times[n])[rounds // 2] for n in steps)
    spread = {n: f"{min(times[n]):.3f}–{max(times[n]):.3f}" for n in steps}
    noisy = any(max(t) > NOISY_SPREAD * min(t) for t in times.values())
    verdict = NOISY if noisy else f"fusedvq is {speed_words(plain / fused)}"
    return (f"time per training step (forward + backward without the optimizer, last batch of {tokens.shape[0]}; "
            f"median of {rounds} rounds of {repeats} steps, fastest–slowest round in parentheses): "
            f"fusedvq {fused:.3f} ms ({spread['fusedvq']}), the plain fix {plain:.3f} ms ({spread['plain']}): "
            f"{verdict}")
