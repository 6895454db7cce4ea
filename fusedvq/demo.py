"""`fusedvq demo`: a VQ-VAE-guided training loop with the fused loss in the hot loop.

The built-in default is generated deterministically (no downloads) and mirrors the motivating case:

    token c ──model (trained)──► latent u [B, 24] ──feature extractor (fixed)──► features [B, 187]
    token c ──codebook[c] [B, 16]──frozen VQ-VAE decoder──► recon [B, 171]
    loss = VQReconLoss(features, recon): normalize with the VQ-VAE's statistics, keep the 171 columns
           its feature_mask kept (16 constant columns were dropped by cleaning), squared error

The decoder is fitted (least squares on its last layer) to the normalized kept features of one true
latent per token, so the model can drive the loss toward zero by learning those latents. The VQ-VAE's
part (mask, input_dim, group_indices, per-category statistics, decoder weights) is written as a
checkpoint in the trainer's format and the loss is built from it with VQReconLoss.from_checkpoint, as
in a real training script. With --checkpoint, the mask and statistics come from that file instead, with
a stand-in extractor and decoder of its widths (its own decoder's architecture is not known here).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SEED = 20240607
FEATURES, KEPT = 187, 171
CATEGORY_SIZES = (24, 18, 30, 12, 27, 21, 15, 24)  # sums to 171, like a clustering of the kept columns
NUM_CODES, CODE_DIM, HIDDEN, LATENT = 256, 16, 32, 24


class FeatureExtractor(nn.Module):
    """Fixed, differentiable: latent u [B, U] → features [B, D] = offset + scale · tanh(u @ A).

    Dropped columns have scale 0 (constant: the reason cleaning dropped them); kept columns are centred
    and scaled like the VQ-VAE's statistics, so normalization matters (raw scales span 4 decades).
    """

    def __init__(self, A: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)  # [U, D]
        self.register_buffer("offset", offset)  # [D]
        self.register_buffer("scale", scale)  # [D]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.offset, self.scale, torch.tanh(u @ self.A))


def make_decoder(K: int) -> nn.Sequential:
    """The tiny VQ-VAE decoder: code [B, CODE_DIM] → recon [B, K]."""
    return nn.Sequential(nn.Linear(CODE_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, K))


def make_model() -> nn.Sequential:
    """The model being trained: token → latent [B, LATENT] that the extractor turns into features."""
    return nn.Sequential(nn.Embedding(NUM_CODES, 64), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, LATENT))


@dataclass
class World:
    mask: torch.Tensor  # [D] bool
    mean_k: torch.Tensor  # [K] float64: the VQ-VAE's statistics of the kept columns
    std_k: torch.Tensor  # [K] float64
    categories: dict[str, list[int]]
    extractor: FeatureExtractor
    codebook: torch.Tensor  # [NUM_CODES, CODE_DIM]
    decoder: nn.Sequential


def default_spec(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, list[int]]]:
    """The built-in VQ-VAE's mask [187] (16 dropped), statistics [171] and categories."""
    mask = torch.ones(FEATURES, dtype=torch.bool)
    mask[torch.randperm(FEATURES, generator=gen)[: FEATURES - KEPT]] = False
    scales = 10 ** (torch.rand(KEPT, generator=gen, dtype=torch.float64) * 4 - 2)  # 0.01 … 100
    mean_k = torch.randn(KEPT, generator=gen, dtype=torch.float64) * scales * 3
    std_k = scales
    order = torch.randperm(KEPT, generator=gen).tolist()
    categories, start = {}, 0
    for i, n in enumerate(CATEGORY_SIZES):
        categories[f"cluster_{i + 1}"] = sorted(order[start : start + n])
        start += n
    return mask, mean_k, std_k, categories


def build_world(mask: torch.Tensor, mean_k: torch.Tensor, std_k: torch.Tensor, categories: dict,
                gen: torch.Generator) -> World:
    """Extractor matched to the statistics, and a decoder fitted to reconstruct one latent per token."""
    D, K = mask.shape[0], int(mask.sum())
    A = torch.randn(LATENT, D, generator=gen, dtype=torch.float64) / math.sqrt(LATENT)
    A[:, ~mask] = 0.0
    offset = torch.randn(D, generator=gen, dtype=torch.float64)  # dropped columns: constants
    scale = torch.zeros(D, dtype=torch.float64)
    # tanh of a unit normal has std ≈ 0.63: scale by σ/0.63 so normalized features have std ≈ 1.
    offset[mask], scale[mask] = mean_k, std_k / 0.63
    extractor = FeatureExtractor(A, offset, scale)
    # Each token's true latent, and the normalized kept features it produces: what the decoder outputs.
    latents = torch.randn(NUM_CODES, LATENT, generator=gen, dtype=torch.float64)
    targets = (extractor(latents)[:, mask] - mean_k) / std_k  # [NUM_CODES, K]
    codebook = torch.randn(NUM_CODES, CODE_DIM, generator=gen, dtype=torch.float64)
    decoder = make_decoder(K).double()
    with torch.no_grad():
        first = decoder[0]
        first.weight.copy_(torch.randn(HIDDEN, CODE_DIM, generator=gen, dtype=torch.float64) / math.sqrt(CODE_DIM))
        first.bias.copy_(torch.randn(HIDDEN, generator=gen, dtype=torch.float64) * 0.1)
        hidden = torch.tanh(first(codebook))  # [NUM_CODES, HIDDEN]
        design = torch.cat([hidden, torch.ones(NUM_CODES, 1, dtype=torch.float64)], 1)
        solution = torch.linalg.lstsq(design, targets).solution  # [HIDDEN + 1, K]
        decoder[2].weight.copy_(solution[:-1].T)
        decoder[2].bias.copy_(solution[-1])
    return World(mask, mean_k, std_k, categories, extractor.float(), codebook.float(), decoder.float().eval())


def write_checkpoint(world: World, folder: Path) -> Path:
    """The VQ-VAE's part of the world in the trainer's format (what VQReconLoss.from_checkpoint reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    std_np, mean_np = world.std_k.numpy(), world.mean_k.numpy()
    path = folder / "best_model.pt"
    torch.save(
        {
            "feature_mask": world.mask.numpy().copy(),
            "model_config": {"input_dim": int(world.mask.sum()), "group_indices": world.categories,
                             "codebook_size": NUM_CODES, "embedding_dim": CODE_DIM, "hidden_dim": HIDDEN},
            "normalization_stats": {
                name: {"mean": mean_np[idx].astype(np.float32), "std": std_np[idx].astype(np.float32)}
                for name, idx in world.categories.items()
            },
            "feature_names": [f"feature_{d}" for d in range(world.mask.shape[0])],
            "model_state_dict": {
                "codebook": world.codebook, **{f"decoder.{k}": v for k, v in world.decoder.state_dict().items()}
            },
            "config": {"generator": "fusedvq demo", "seed": SEED},
        },
        path,
    )  # fmt: skip
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per step (default: 256)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="a VQ-VAE checkpoint (file or folder) whose mask and statistics to use instead "
                             "of the built-in default")
    parser.add_argument("--trust", action="store_true",
                        help="allow pickled objects in --checkpoint (can run code stored in the file)")
    parser.add_argument("--save-checkpoint", metavar="DIR",
                        help="also write the built-in default's checkpoint into DIR (to try `fusedvq check`)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # raises RuntimeError with torch's message for a bad name
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, out=None) -> int:
    """Train; print the setup, a progress bar, the loss falling and the time per step. Returns an exit code."""
    from .checkpoint import CheckpointError
    from .recon import VQReconLoss

    out = out or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    if args.steps < 1 or args.batch_size < 1:
        say(f"error: --steps and --batch-size must be positive (got {args.steps} and {args.batch_size})")
        return 2
    try:
        device = _device(args.device)
    except (ValueError, RuntimeError) as err:
        say(f"error: {err}")
        return 2
    # Seeded and deterministic; the caller's global RNG state is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # the model's initialization; the data use their own generators
        gen = torch.Generator().manual_seed(SEED)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if args.checkpoint:
                    recon_loss = VQReconLoss.from_checkpoint(args.checkpoint, trust=args.trust)
                    spec = recon_loss.spec
                    world = build_world(spec.feature_mask, spec.mean, spec.std, dict(spec.categories), gen)
                    source = f"{spec.path} (stand-in extractor and decoder of its widths)"
                else:
                    world = build_world(*default_spec(gen), gen)
                    ckpt = write_checkpoint(world, Path(args.save_checkpoint or tmp))
                    recon_loss = VQReconLoss.from_checkpoint(ckpt, num_features=FEATURES)
                    source = f"built-in default, written to {ckpt}" if args.save_checkpoint else "built-in default"
            except CheckpointError as err:
                say(f"error: {err}")
                say("run `fusedvq check PATH` for the full report")
                return 1
        # At these sizes (B × 187) intra-op threading costs more in synchronization than it saves, and
        # much more when other processes share the cores: train on one CPU thread, then restore it.
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return _train(args, world, recon_loss, device, source, say)
        finally:
            torch.set_num_threads(threads)


def _train(args, world: World, recon_loss, device: torch.device, source: str, say) -> int:
    from tqdm import tqdm

    from .backend import use_triton_for

    D, K = recon_loss.num_features, recon_loss.num_kept
    extractor, decoder = world.extractor.to(device), world.decoder.to(device)
    codebook, recon_loss = world.codebook.to(device), recon_loss.to(device)
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    probe = torch.empty(1, 1, device=device)
    fused = use_triton_for("auto", probe)
    backend = "triton (fused kernels)" if fused else "reference (pure PyTorch; CUDA + Triton run the fused kernels)"

    say("fusedvq demo: VQ-VAE-guided training with the fused masked-MSE loss")
    say(f"  checkpoint  {source}")
    say(f"  features    {D} columns from the feature extractor")
    say(f"  VQ-VAE      feature_mask keeps {K} of {D}, decoder input_dim {K}, "
        f"{len(recon_loss.categories)} categories, per-category {recon_loss.spec.method} statistics")
    say(f"  device      {device}, backend {backend}")
    for line in _crash_lines(recon_loss, device):
        say(line)
    say(f"  training    {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}")

    data_gen = torch.Generator(device=device).manual_seed(SEED + 1)
    log_every = max(1, args.steps // 10)
    warmup = min(5, args.steps - 1)  # first steps include one-off costs (allocations, kernel compilation)
    history: list[tuple[int, float]] = []
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
    start = time.perf_counter()
    t_warm = start
    for step in bar:
        codes = torch.randint(NUM_CODES, (args.batch_size,), generator=data_gen, device=device)
        with torch.no_grad():
            recon = decoder(codebook[codes])  # [B, K], the frozen VQ-VAE's reconstruction
        features = extractor(model(codes))  # [B, D], through the trained model
        loss = recon_loss(features, recon)  # the fused loss: normalize, keep K of D, squared error
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == warmup:
            _sync(device)
            t_warm = time.perf_counter()
        if step == 1 or step % log_every == 0 or step == args.steps:
            value = loss.item()  # a host sync only at the log points
            history.append((step, value))
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    _sync(device)
    end = time.perf_counter()
    bar.close()

    say("   step        loss")
    for step, value in history:
        say(f"  {step:5d}  {value:10.4g}")
    first, last = history[0][1], history[-1][1]
    ratio = first / last if last > 0 else float("inf")
    say(f"loss fell from {first:.4g} to {last:.4g} ({ratio:.0f}x lower) in {args.steps} steps"
        if last < first else f"loss went from {first:.4g} to {last:.4g} in {args.steps} steps")
    steady = args.steps - warmup
    per_step = (end - t_warm) / steady * 1e3 if steady > 0 else (end - start) * 1e3 / args.steps
    say(f"time: {end - start:.2f} s in all, {per_step:.2f} ms/step"
        + (f" (steady state, after {warmup} warm-up steps)" if steady > 0 else ""))
    say(_parity_line(recon_loss, features.detach(), recon, world))
    say(_timing_line(recon_loss, features.detach(), recon, world, device))
    return 0


def _crash_lines(recon_loss, device: torch.device) -> list[str]:
    """What the naive loss does with these widths, and what fusedvq says when the pieces do not fit."""
    D, K = recon_loss.num_features, recon_loss.num_kept
    features, recon = torch.randn(4, D, device=device), torch.randn(4, K, device=device)
    lines = []
    try:
        with warnings.catch_warnings():  # its broadcasting warning is beside the point: it is about to fail
            warnings.simplefilter("ignore")
            F.mse_loss(recon, features)  # the naive loss: reconstruction [B, K] against all D feature columns
        lines.append("  naive loss  F.mse_loss(recon, normalize(features)) ran: D == K here")
    except RuntimeError as err:
        lines.append(f"  naive loss  F.mse_loss(recon, normalize(features)) -> RuntimeError: {str(err).splitlines()[0]}")
    try:
        recon_loss(features, features)
    except ValueError as err:
        lines.append(f"  fusedvq     given the {D}-column features as target -> ValueError: {err}")
    return lines


def _parity_line(recon_loss, features: torch.Tensor, recon: torch.Tensor, world: World) -> str:
    """The fused loss on the last batch against the straightforward fix, in float64."""
    x, r = features.double().cpu(), recon.double().cpu()
    plain = F.mse_loss(r, ((x[:, world.mask] - world.mean_k) / world.std_k))
    fused = recon_loss(features, recon).double().cpu()
    rel = abs(float(fused - plain)) / max(abs(float(plain)), 1e-30)
    return (f"check: fused loss {float(fused):.6g} vs plain PyTorch (normalize, x[:, mask], F.mse_loss) "
            f"{float(plain):.6g}: relative difference {rel:.1e}")


def _timing_line(recon_loss, features: torch.Tensor, recon: torch.Tensor, world: World, device: torch.device,
                 repeats: int = 50) -> str:
    """The loss alone (forward + backward) on the last batch: fusedvq against the plain fix."""
    mask = world.mask.to(device)
    mean = torch.zeros(mask.shape[0], dtype=torch.float64)
    std = torch.ones(mask.shape[0], dtype=torch.float64)
    mean[world.mask], std[world.mask] = world.mean_k, world.std_k
    mean, std = mean.to(device, features.dtype), std.to(device, features.dtype)
    x = features.detach().requires_grad_()

    def fused():
        recon_loss(x, recon).backward()

    def plain():  # the straightforward fix: normalize all D columns, keep K, F.mse_loss
        F.mse_loss(((x - mean) / std)[:, mask], recon).backward()

    times = {}
    for name, fn in (("fused", fused), ("plain", plain)):
        for _ in range(3):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        times[name] = (time.perf_counter() - t0) / repeats * 1e3
    return (f"loss alone (forward + backward, batch {x.shape[0]}, mean of {repeats}): fusedvq "
            f"{times['fused']:.3f} ms, the plain fix {times['plain']:.3f} ms")
