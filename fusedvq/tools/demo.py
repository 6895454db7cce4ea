"""`fusedvq demo`: the motivating project's VQ-led training step, with FeatureCleaner in the hot loop.

    features = extractor(model(tokens))                 # [B, 187]
    z = cleaner(features)                               # FeatureCleaner: batch statistics, 171 kept columns
    recon, commitment = vq(z)                           # frozen grouped encoder → quantize → decoder
    loss = F.mse_loss(recon, z) + λ·commitment          # z is the encoder's input and the target
                                                        # (as cleaner.recon_loss(recon, z, "column").mean():
                                                        #  the per-category errors come from the same pass)

The world (extractor, VQ-VAE, checkpoint) is world.py's. The demo first shows what goes wrong
without fusedvq: the naive loss crashes on the widths, and an encoder fed the raw 187 features runs and
reads the wrong columns. It then trains with a progress bar, prints the loss falling, checks the step
against the plain fix in float64, times the two steps side by side, and ends with each category's
reconstruction error from the last step's loss pass, which a mean over all columns hides. With --checkpoint, the mask and
categories come from that file, with a stand-in extractor and VQ-VAE of its widths.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .world import FEATURES, SEED, NUM_TOKENS, World, build_world, default_spec, make_model, write_checkpoint

COMMITMENT = 0.25  # λ


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per step (default: 64)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="a VQ-VAE checkpoint (file or folder) whose mask and categories to use instead "
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
    from .. import CheckpointError, FeatureCleaner, load_feature_spec

    out = out or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    if args.steps < 1 or args.batch_size < 2:
        say(f"error: --steps must be positive and --batch-size at least 2 (batch statistics), got {args.steps} "
            f"and {args.batch_size}")
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
                    spec = load_feature_spec(args.checkpoint, trust=args.trust)
                    world = _world_of(spec, gen)
                    source = f"{spec.path} (stand-in extractor and VQ-VAE of its widths)"
                else:
                    world = build_world(*default_spec(gen), gen)
                    ckpt = write_checkpoint(world, Path(args.save_checkpoint or tmp))
                    # Its statistics are in the file just written: a statistics file near it is not asked.
                    spec = load_feature_spec(ckpt, num_features=FEATURES, stats="checkpoint")
                    source = f"built-in default, written to {ckpt}" if args.save_checkpoint else "built-in default"
                cleaner = FeatureCleaner.from_spec(spec, norm="batch", nan_to_num=True)
            except CheckpointError as err:
                say(f"error: {err}")
                say("run `fusedvq check PATH` for the full report")
                return 1
        # At these sizes intra-op threading costs more in synchronization than it saves, and much more when
        # other processes share the cores: train on one CPU thread, then restore it.
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return _train(args, world, cleaner, device, source, say)
        finally:
            torch.set_num_threads(threads)


def _world_of(spec, gen: torch.Generator) -> World:
    K = spec.num_kept
    mean = spec.mean if spec.mean is not None else torch.zeros(K, dtype=torch.float64)
    std = spec.std if spec.std is not None else torch.ones(K, dtype=torch.float64)
    categories = {k: list(v) for k, v in spec.categories.items()} or {"all": list(range(K))}
    return build_world(spec.feature_mask, mean, std, categories, gen)


def plain_clean(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The plain fix: nan_to_num → mean → unbiased std (σ < eps → 1) → normalize → nan_to_num → x[:, mask]."""
    x = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
    std = x.std(0)
    z = (x - x.mean(0)) / torch.where(std < eps, torch.ones_like(std), std)
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)[:, mask]


def _step_loss(world: World, model, tokens, clean, recon_loss=None):
    """(loss, the per-column errors [K] when recon_loss (a FeatureCleaner's) is given, else None)."""
    features = world.extractor(model(tokens))  # [B, D]
    z = clean(features)  # [B, K]: the encoder's input and the loss's target
    recon, commitment = world.vq(z)
    if recon_loss is None:
        return F.mse_loss(recon, z) + COMMITMENT * commitment, None
    columns = recon_loss(recon, z, reduction="column")  # its mean is F.mse_loss(recon, z)
    return columns.mean() + COMMITMENT * commitment, columns


def _train(args, world: World, cleaner, device: torch.device, source: str, say) -> int:
    from tqdm import tqdm

    from ..ops import use_triton_for

    D, K = cleaner.num_features, cleaner.num_kept
    world.extractor.to(device)
    world.vq.to(device)
    cleaner = cleaner.to(device)
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    fused = use_triton_for("auto", torch.empty(1, 1, device=device))
    backend = "triton (fused kernels)" if fused else "reference (pure PyTorch; CUDA + Triton run the fused kernels)"

    say("fusedvq demo: the VQ-led training step with FeatureCleaner (batch statistics, nan_to_num)")
    say(f"  checkpoint  {source}")
    say(f"  features    {D} columns from the feature extractor")
    say(f"  VQ-VAE      feature_mask keeps {K} of {D}, grouped encoder over {len(world.categories)} categories, "
        f"straight-through quantizer, decoder of {K} columns")
    say(f"  device      {device}, backend {backend}")
    for line in _pitfalls(world, cleaner, device):
        say(line)
    say(f"  training    {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}, "
        f"loss = F.mse_loss(recon, z) + {COMMITMENT:g}·commitment")

    data_gen = torch.Generator(device=device).manual_seed(SEED + 1)
    log_every = max(1, args.steps // 10)
    history: list[tuple[int, float]] = []
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
    start = time.perf_counter()
    for step in bar:
        tokens = torch.randint(NUM_TOKENS, (args.batch_size,), generator=data_gen, device=device)
        loss, columns = _step_loss(world, model, tokens, cleaner, cleaner.recon_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % log_every == 0 or step == args.steps:
            value = loss.item()  # a host sync only at the log points
            history.append((step, value))
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    _sync(device)
    elapsed = time.perf_counter() - start
    bar.close()

    say("   step        loss")
    for step, value in history:
        say(f"  {step:5d}  {value:10.4g}")
    first, last = history[0][1], history[-1][1]
    ratio = first / last if last > 0 else float("inf")
    say(f"loss fell from {first:.4g} to {last:.4g} ({ratio:.1f}× lower) in {args.steps} steps"
        if last < first else f"loss went from {first:.4g} to {last:.4g} in {args.steps} steps")
    say(f"training time: {elapsed:.2f} s of wall time for the {args.steps} steps above, "
        f"{elapsed / args.steps * 1e3:.2f} ms per step (model, FeatureCleaner, VQ-VAE, backward and Adam)")
    say(_parity_line(world, model, cleaner, tokens))
    say(_timing_line(world, model, cleaner, tokens, device))
    for line in _category_lines(cleaner, columns.detach()):
        say(line)
    return 0


def _category_lines(cleaner, columns: torch.Tensor) -> list[str]:
    """Each category's reconstruction error in the last step, from the loss's own per-column errors."""
    from .. import gini

    if not cleaner.categories:
        return []
    errors = cleaner.category_errors(columns).cpu()  # one small copy at the end, not per step
    mean = float(columns.mean())
    lines = [f"reconstruction error per category (the last step's loss pass, reduction=\"column\" → "
             f"category_errors; F.mse_loss's one number is {mean:.4g}):"]
    width = max(len(n) for n in cleaner.category_names)
    for name, value in zip(cleaner.category_names, errors.tolist()):
        n = len(set(cleaner.categories[name]))
        lines.append(f"  {name:<{width}}  {n:3d} columns  {value:10.4g}  ({value / mean:.1f}× the mean)"
                     if mean > 0 else f"  {name:<{width}}  {n:3d} columns  {value:10.4g}")
    worst = int(errors.argmax())
    if mean > 0:
        lines.append(f"  the worst, {cleaner.category_names[worst]!r}, is {float(errors[worst]) / mean:.1f}× the mean "
                     f"over all columns, which hides it; balance over categories (Gini) {float(gini(errors)):.2f}")
    return lines


def _pitfalls(world: World, cleaner, device: torch.device) -> list[str]:
    """What goes wrong without fusedvq at these widths, and what fusedvq says instead."""
    D, K = cleaner.num_features, cleaner.num_kept
    mask = cleaner_mask(cleaner)
    features = torch.randn(8, D, device=device)
    recon = torch.randn(8, K, device=device)
    lines = []
    try:
        with warnings.catch_warnings():  # its broadcasting warning is beside the point: it is about to fail
            warnings.simplefilter("ignore")
            F.mse_loss(recon, features)  # the naive loss: the reconstruction against all D feature columns
        lines.append("  naive loss  F.mse_loss(recon, normalize(features)) ran: D == K here")
    except RuntimeError as err:
        lines.append(f"  naive loss  F.mse_loss(recon, normalize(features)) -> RuntimeError: {str(err).splitlines()[0]}")
    if D > K:
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


def _parity_line(world: World, model, cleaner, tokens) -> str:
    """The last batch's cleaned features, FeatureCleaner against the plain fix, both in float64."""
    with torch.no_grad():
        features = world.extractor(model(tokens)).double().cpu()
    mask = cleaner_mask(cleaner).cpu()
    z_fused = cleaner.cpu()(features)  # (float64: the reference path)
    cleaner.to(tokens.device)
    z_plain = plain_clean(features, mask)
    rel = float((z_fused - z_plain).norm() / z_plain.norm().clamp_min(1e-30))
    return (f"check: FeatureCleaner's z vs the plain fix (nan_to_num, mean, std, σ<eps→1, normalize, "
            f"nan_to_num, x[:, mask]) in float64: relative difference {rel:.1e}")


def _timing_line(world: World, model, cleaner, tokens, device: torch.device, rounds: int = 5) -> str:
    """The whole training step (forward + backward) on the last batch: FeatureCleaner against the plain
    fix, in alternating rounds (the same minutes of the same machine): the median per step, the fastest and
    slowest rounds, and which is faster, or that the rounds spread too wide to say (as `fusedvq bench`)."""
    from .benchmark import NOISY, NOISY_SPREAD, speed_words

    mask = cleaner_mask(cleaner)
    params = list(model.parameters())

    def step(clean):
        loss, _ = _step_loss(world, model, tokens, clean)
        torch.autograd.grad(loss, params)

    steps = {"fusedvq": lambda: step(cleaner), "plain": lambda: step(lambda f: plain_clean(f, mask))}
    times = {name: [] for name in steps}
    repeats = 20
    for _ in range(rounds):
        for name, fn in steps.items():
            fn()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / repeats * 1e3)
    fused, plain = (sorted(times[n])[rounds // 2] for n in steps)
    spread = {n: f"{min(times[n]):.3f}–{max(times[n]):.3f}" for n in steps}
    noisy = any(max(t) > NOISY_SPREAD * min(t) for t in times.values())
    verdict = NOISY if noisy else f"fusedvq is {speed_words(plain / fused)}"
    return (f"time per training step (forward + backward without the optimizer, last batch of {tokens.shape[0]}; "
            f"median of {rounds} rounds of {repeats} steps, fastest–slowest round in parentheses): "
            f"fusedvq {fused:.3f} ms ({spread['fusedvq']}), the plain fix {plain:.3f} ms ({spread['plain']}): "
            f"{verdict}")
