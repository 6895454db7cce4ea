"""P partial reconstructions against one target on the CPU: fusedvq.PartialsMSELoss forward + backward
against the eager loop the motivating project runs (the target cleaned once, then one F.mse_loss per partial,
summed and divided by P), both with gradients for the features and every partial, in the same run.

    python bench/partials_cpu.py [--partials 24] [--batches 4 1024 16384] [--seconds 0.5] [--rounds 7] [--stacked]
                                 [--loop-target expression|cleaner]

The loop's target is the project's plain expression ((x − mean) / std)[:, mask] by default; --loop-target
cleaner gives it fusedvq.FeatureCleaner's target instead (the fused op's own normalization), so that the
ratio measures the P losses alone.

Rounds alternate between the providers (both see the same machine state); each round's time is the median
step, each round gives a loop/fused ratio (> 1: fused faster), and the table shows the median ratio over the
rounds with its range, and the load average before and after (a busy machine spreads the rounds: rerun with
OMP_NUM_THREADS=1 there, which keeps the ops out of parallel regions that wait for a descheduled thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fusedvq

D, K = 187, 171


def make(B: int, P: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=g)[:K]] = True
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    x = torch.randn(B, D, generator=g).requires_grad_()
    partials = [torch.randn(B, K, generator=g).requires_grad_() for _ in range(P)]
    return mask, mean, std, x, partials


def zero_grads(*tensors):
    """optimizer.zero_grad()'s default: every gradient set to None before the step."""
    for t in tensors:
        t.grad = None


def loop_step(x, partials, mask, mean, std, cleaner=None):
    zero_grads(x, *partials)
    target = ((x - mean) / std)[:, mask] if cleaner is None else cleaner(x)
    loss = sum(F.mse_loss(p, target) for p in partials) / len(partials)
    loss.backward()
    return loss


def fused_step(loss_fn, x, partials):
    zero_grads(x, *(partials if isinstance(partials, list) else [partials]))
    loss = loss_fn(x, partials)
    loss.backward()
    return loss


def time_round(step, seconds: float) -> float:
    """Median seconds of one step over a round of about `seconds`."""
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partials", type=int, default=24)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 1024, 16384])
    parser.add_argument("--seconds", type=float, default=0.5, help="per round and provider")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--stacked", action="store_true", help="give the fused op one [P, B, K] tensor")
    parser.add_argument("--loop-target", choices=["expression", "cleaner"], default="expression",
                        help="the loop's target: the plain expression, or fusedvq.FeatureCleaner's")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, P = {args.partials}, D = {D}, K = {K}, "
          f"partials given as {'one [P, B, K] tensor' if args.stacked else 'a list'}, loop target: "
          f"{args.loop_target}, load {load:.1f}")
    print(f"{'B':>6} {'loop ms':>9} {'fused ms':>9} {'ratio':>7}  {'range':>13}")
    for B in args.batches:
        mask, mean, std, x, partials = make(B, args.partials)
        loss_fn = fusedvq.PartialsMSELoss(mask, mean, std)
        cleaner = fusedvq.FeatureCleaner(mask, mean, std) if args.loop_target == "cleaner" else None
        given = torch.stack(partials).detach().requires_grad_() if args.stacked else partials
        with torch.no_grad():
            target = ((x - mean) / std)[:, mask]
            ref = sum(F.mse_loss(p, target) for p in partials) / len(partials)
            got = loss_fn(x, given)
        assert torch.allclose(got, ref, rtol=1e-5), (got, ref)
        loops, fuseds = [], []
        for _ in range(args.rounds):
            loops.append(time_round(lambda: loop_step(x, partials, mask, mean, std, cleaner), args.seconds))
            fuseds.append(time_round(lambda: fused_step(loss_fn, x, given), args.seconds))
        ratios = sorted(a / b for a, b in zip(loops, fuseds))
        print(f"{B:>6} {statistics.median(loops) * 1e3:>9.3f} {statistics.median(fuseds) * 1e3:>9.3f} "
              f"{statistics.median(ratios):>6.2f}x  {ratios[0]:>5.2f}-{ratios[-1]:.2f}x")
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
