"""What the per-column errors and the weights cost on the CPU, side by side in one run: forward+backward of
MaskedMSELoss (backend="reference", float32, D = 187, K = 171) with reduction "mean" (the scalar loss),
"column" (back-propagated through its mean, as a training loop that logs the columns does), and "mean"
weighted, for norm "stats" and "batch", at B = 1024 and 65536.

    python bench/columns_cpu.py [--rounds 5]

The cases take turns within each round (the same minutes of the same machine); a cell is the minimum over
the rounds, and the ratios are to the scalar loss of the same norm and B.
"""

import argparse
import time

import torch

import fusedvq

D, K = 187, 171
SIZES = (1024, 65536)


def measure(rounds: int) -> dict:
    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D)[:K]] = True
    mean, std, weight = torch.randn(D), torch.rand(D) + 0.5, torch.rand(K) + 0.5
    best = {}
    for B in SIZES:
        x = torch.randn(B, D, requires_grad=True)
        r = torch.randn(B, K)
        steps = 40 if B == 1024 else 3
        for norm in ("stats", "batch"):
            kw = dict(mean=mean, std=std) if norm == "stats" else dict(nan_to_num=True)
            calls = {
                "scalar": fusedvq.MaskedMSELoss(mask, norm=norm, backend="reference", **kw),
                "column": (lambda m: lambda x, r: m(x, r).mean())(
                    fusedvq.MaskedMSELoss(mask, norm=norm, reduction="column", backend="reference", **kw)),
                "weighted": fusedvq.MaskedMSELoss(mask, norm=norm, weight=weight, backend="reference", **kw),
            }
            for _ in range(rounds):
                for name, fn in calls.items():
                    for _ in range(2):  # warm
                        x.grad = None
                        fn(x, r).backward()
                    start = time.perf_counter()
                    for _ in range(steps):
                        x.grad = None
                        fn(x, r).backward()
                    ms = (time.perf_counter() - start) / steps * 1e3
                    key = (B, norm, name)
                    best[key] = min(best.get(key, float("inf")), ms)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    best = measure(parser.parse_args().rounds)
    print("| B | norm | scalar (ms) | column (ms) | column/scalar | weighted (ms) | weighted/scalar |")
    print("|---|---|---|---|---|---|---|")
    for B in SIZES:
        for norm in ("stats", "batch"):
            s, c, w = (best[(B, norm, n)] for n in ("scalar", "column", "weighted"))
            print(f"| {B} | {norm} | {s:.3f} | {c:.3f} | {c / s:.2f} | {w:.3f} | {w / s:.2f} |")


if __name__ == "__main__":
    main()
