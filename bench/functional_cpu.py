"""The functional forms' per-call cost at B = 4 on the CPU: masked_mse, clean_features + F.mse_loss and
MaskedMSELoss (for reference), forward + backward, against the plain fix, rounds taken in turns.

    OMP_NUM_THREADS=1 python bench/functional_cpu.py [--rounds 9] [--calls 2000]

Prints each call's median µs per step (fastest–slowest round) and its ratio to the plain fix's median. A
repeated functional call with the same index and statistics tensors reuses its validated plan (docs/api.md);
to compare trees, run this file with PYTHONPATH set to each tree's root in turn.
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F

import fusedvq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    D, K, B = 187, 171, 4
    mask = torch.ones(D, dtype=torch.bool)
    mask[torch.randperm(D)[: D - K]] = False
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    x, r = torch.randn(B, D, requires_grad=True), torch.randn(B, K, requires_grad=True)
    module = fusedvq.MaskedMSELoss(mask, mean, std)
    steps = {
        "plain fix": lambda: F.mse_loss(((x - mean) / std)[:, mask], r).backward(),
        "masked_mse": lambda: fusedvq.masked_mse(x, r, mask, mean, std).backward(),
        "clean_features + mse": lambda: F.mse_loss(fusedvq.clean_features(x, mask, mean, std), r).backward(),
        "MaskedMSELoss": lambda: module(x, r).backward(),
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(args.rounds):  # in turns: a slower stretch of the machine touches every call alike
        for name, step in steps.items():
            times[name].append(timeit.timeit(step, number=args.calls) / args.calls * 1e6)
    plain = statistics.median(times["plain fix"])
    print(f"torch {torch.__version__}, B = {B}, D = {D}, K = {K}, forward + backward, {args.rounds} rounds of "
          f"{args.calls} calls, µs per call: median (fastest–slowest round), the plain fix's median over it")
    for name, ts in times.items():
        median = statistics.median(ts)
        print(f"  {name:22s} {median:7.1f} ({min(ts):.1f}–{max(ts):.1f})  {plain / median:.2f}×")


if __name__ == "__main__":
    main()
