"""Forward+backward time per step of MaskedMSELoss(backend="reference") on the CPU, for an A/B of two
checkouts: run it alternately with each on PYTHONPATH (the checkout's root), a few times, and compare the
minima (one line per run, labelled by the first argument):

    for i in 1 2 3; do
        (cd OLD && PYTHONPATH=$PWD python /path/to/bench/ab_cpu_step.py old)
        python bench/ab_cpu_step.py new
    done

Minima of several rounds, because a shared 2-core machine adds noise of tens of percent to any one round.
"""

import sys
import time

import torch

import fusedvq

D, K = 187, 171
CASES = [(4, "stats"), (4, "batch"), (65536, "stats"), (65536, "batch")]


def main(label: str) -> None:
    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D)[:K]] = True
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    results = []
    for B, norm in CASES:
        stats = dict(mean=mean, std=std) if norm == "stats" else {}
        loss_fn = fusedvq.MaskedMSELoss(mask, norm=norm, backend="reference", **stats)
        x = torch.randn(B, D, requires_grad=True)
        r = torch.randn(B, K)

        def step():
            x.grad = None
            loss_fn(x, r).backward()

        steps = 400 if B == 4 else 8
        for _ in range(max(3, steps // 10)):
            step()
        rounds = []
        for _ in range(9 if B == 4 else 4):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            rounds.append((time.perf_counter() - start) / steps * 1e3)
        results.append(f"B={B} {norm}: {min(rounds):.4f} ms")
    print(label, " | ".join(results))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this checkout")
