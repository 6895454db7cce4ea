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
categories come from that file, with a stand-in extractor and VQ-VAE of its widths; a hybrid VQ-VAE's
checkpoint runs the hybrid step (hybrid_step.py: the objective over all K + c decoder columns, the
categories in decoder space). demo_checks.py holds what the demo shows beside training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .demo_checks import parity_lines, pitfalls, sync, timing_line
from .hybrid_step import hybrid_loss, hybrid_world
from .world import (
    COMMITMENT, FEATURES, SEED, NUM_TOKENS, World, build_world, default_spec, make_model, write_checkpoint,
)


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
    if spec.hybrid is not None:
        decoder = {k: list(v) for k, v in spec.decoder_categories.items()} or None
        return hybrid_world(spec, mean, std, decoder, gen)
    categories = {k: list(v) for k, v in spec.categories.items()} or {"all": list(range(K))}
    return build_world(spec.feature_mask, mean, std, categories, gen)


def _step_loss(world: World, model, tokens, clean, cleaner=None):
    """(loss, the per-column errors [K] (hybrid: [K + c]) when cleaner (a FeatureCleaner, whose recon_loss
    computes the loss) is given, else None)."""
    u = model(tokens)
    features = world.extractor(u)  # [B, D]
    z = clean(features)  # [B, K]: the encoder's input and the loss's target
    if world.initial is not None:  # hybrid: hybrid_step.py
        return hybrid_loss(world, u, z, cleaner)
    recon, commitment = world.vq(z)
    if cleaner is None:
        return F.mse_loss(recon, z) + COMMITMENT * commitment, None
    columns = cleaner.recon_loss(recon, z, reduction="column")  # its mean is F.mse_loss(recon, z)
    return columns.mean() + COMMITMENT * commitment, columns


def _train(args, world: World, cleaner, device: torch.device, source: str, say) -> int:
    from tqdm import tqdm

    from ..ops import use_triton_for

    D, K = cleaner.num_features, cleaner.num_kept
    for part in (world.extractor, world.vq, world.initial):
        if part is not None:
            part.to(device)
    cleaner = cleaner.to(device)
    model = make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    fused = use_triton_for("auto", torch.empty(1, 1, device=device))
    backend = "triton (fused kernels)" if fused else "reference (pure PyTorch; CUDA + Triton run the fused kernels)"

    say("fusedvq demo: the VQ-led training step with FeatureCleaner (batch statistics, nan_to_num)")
    say(f"  checkpoint  {source}")
    say(f"  features    {D} columns from the feature extractor")
    W = world.vq.num_kept  # the decoder's width: K, or K + c for a hybrid
    (p, c), objective = cleaner.gap, "F.mse_loss(recon, z)"
    hybrid = "" if world.initial is None else (
        f"hybrid: a stand-in initial encoder adds {c} embedding columns (decoder columns {p}..{p + c - 1}), ")
    say(f"  VQ-VAE      feature_mask keeps {K} of {D}, {hybrid}grouped encoder over {len(world.vq.names)} "
        f"categories, straight-through quantizer, decoder of {W} columns")
    say(f"  device      {device}, backend {backend}")
    for line in pitfalls(world, cleaner, device):
        say(line)
    if world.initial is not None:
        objective = (f"F.mse_loss(recon, combine(z, embeddings)) over all {W} decoder columns (cleaner.recon_loss "
                     f"with embeddings=)")
    say(f"  training    {args.steps} steps, batch {args.batch_size}, Adam lr {args.lr:g}, "
        f"loss = {objective} + {COMMITMENT:g}·commitment")

    data_gen = torch.Generator(device=device).manual_seed(SEED + 1)
    log_every = max(1, args.steps // 10)
    history: list[tuple[int, float]] = []
    bar = tqdm(range(1, args.steps + 1), desc="training", unit="step", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.25)
    start = time.perf_counter()
    for step in bar:
        tokens = torch.randint(NUM_TOKENS, (args.batch_size,), generator=data_gen, device=device)
        loss, columns = _step_loss(world, model, tokens, cleaner, cleaner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % log_every == 0 or step == args.steps:
            value = loss.item()  # a host sync only at the log points
            history.append((step, value))
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    sync(device)
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
    for line in parity_lines(world, model, cleaner, tokens):
        say(line)
    hybrid = world.initial is not None  # (its fused step times the hybrid objective; the built-in's, the cleaning)
    say(timing_line(lambda clean, fused: _step_loss(world, model, tokens, clean, cleaner if fused and hybrid
                                                    else None)[0], model, cleaner, tokens, device))
    for line in _category_lines(world, cleaner, columns.detach()):
        say(line)
    return 0


def _category_lines(world: World, cleaner, columns: torch.Tensor) -> list[str]:
    """Each category's reconstruction error in the last step, from the loss's own per-column errors: the
    kept columns' categories, or a hybrid's in decoder space (the INITIAL category with its embeddings)."""
    from .. import gini

    mean = float(columns.mean())
    if world.initial is None:
        if not cleaner.categories:
            return []
        categories = cleaner.categories
        errors = cleaner.category_errors(columns).cpu()  # one small copy at the end, not per step
        lines = [f"reconstruction error per category (the last step's loss pass, reduction=\"column\" → "
                 f"category_errors; F.mse_loss's one number is {mean:.4g}):"]
    else:
        (p, c), categories = cleaner.gap, world.categories
        if not categories:
            return [f"no per-category errors: the checkpoint declares no decoder categories "
                    f"(model_config's group_indices)"]
        errors = cleaner.category_errors(columns).cpu()  # (the cleaner's decoder_categories)
        initial = [n for n, idx in categories.items() if set(idx) & set(range(p, p + c))]
        lines = [f"reconstruction error per category in decoder space (the last step's loss pass, reduction="
                 f"\"column\" → [{columns.numel()}] errors averaged over each category's decoder columns, "
                 f"{' and '.join(map(repr, initial))} with the {c} embedding columns; F.mse_loss's one number "
                 f"is {mean:.4g}):"]
    names = list(categories)
    width = max(len(n) for n in names)
    for name, value in zip(names, errors.tolist()):
        n = len(set(categories[name]))
        lines.append(f"  {name:<{width}}  {n:3d} columns  {value:10.4g}  ({value / mean:.1f}× the mean)"
                     if mean > 0 else f"  {name:<{width}}  {n:3d} columns  {value:10.4g}")
    worst = int(errors.argmax())
    if mean > 0:
        lines.append(f"  the worst, {names[worst]!r}, is {float(errors[worst]) / mean:.1f}× the mean "
                     f"over all columns, which hides it; balance over categories (Gini) {float(gini(errors)):.2f}")
    return lines
