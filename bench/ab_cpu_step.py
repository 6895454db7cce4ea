"""Forward+backward time per step on the CPU (backend="reference", float32, D = 187, K = 171), for an A/B of
two checkouts in one run: MaskedMSELoss norm "stats" and "batch", and FeatureCleaner(norm="batch") +
F.mse_loss, at B = 4, 1024 and 65536, with the plain fix beside each at B = 4.

    python bench/ab_cpu_step.py --against OLD_CHECKOUT [--rounds 3]

runs this script's measurement in fresh interpreters, alternating this checkout and OLD_CHECKOUT (each on
PYTHONPATH), and prints the minimum per case over the rounds (a shared 2-core machine adds noise of tens
of percent to any one round; minima of alternating rounds compare like with like).
"""

import time

import torch
import torch.nn.functional as F

import checkouts

D, K = 187, 171
SIZES = (4, 1024, 65536)


def _plain(x, r, mask, mean, std, norm):
    if norm == "stats":
        return F.mse_loss(((x - mean) / std)[:, mask], r)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    s = x.std(0)
    z = torch.nan_to_num((x - x.mean(0)) / torch.where(s < 1e-8, torch.ones_like(s), s), nan=0.0, posinf=0.0,
                         neginf=0.0)
    return F.mse_loss(z[:, mask], r)


def measure() -> dict:
    import fusedvq

    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D)[:K]] = True
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    calls = {
        "stats": fusedvq.MaskedMSELoss(mask, mean=mean, std=std, backend="reference"),
        "batch": fusedvq.MaskedMSELoss(mask, norm="batch", nan_to_num=True, backend="reference"),
        "cleaner": (lambda c: (lambda x, r: F.mse_loss(c(x), r)))(
            fusedvq.FeatureCleaner(mask, norm="batch", nan_to_num=True, backend="reference")),
    }
    out = {}
    for B in SIZES:
        x = torch.randn(B, D, requires_grad=True)
        r = torch.randn(B, K)
        cases = dict(calls)
        if B == 4:
            cases.update({f"plain {n}": (lambda n: lambda x, r: _plain(x, r, mask, mean, std, n))(n)
                          for n in ("stats", "batch")})
        steps = {4: 400, 1024: 40, 65536: 3}[B]
        for name, fn in cases.items():
            def step():
                x.grad = None
                fn(x, r).backward()
            for _ in range(max(3, steps // 10)):
                step()
            best = float("inf")
            for _ in range(7 if B == 4 else 3):
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                best = min(best, (time.perf_counter() - start) / steps * 1e6)
            out[f"B={B} {name}"] = best
    return out


def main() -> None:
    runs = checkouts.run(__doc__.splitlines()[0], __file__, measure)
    if runs is None:
        return
    best = {label: {case: min(run[case] for run in results) for case in results[0]} for label, results in runs.items()}
    labels = list(best)
    print("| case | " + " | ".join(f"{label} (µs)" for label in labels) + (" | new/old |" if "old" in runs else " |"))
    print("|---" * (len(labels) + 1 + ("old" in runs)) + "|")
    for case in best[labels[0]]:
        cells = [f"{best[label].get(case, float('nan')):.1f}" for label in labels]
        ratio = ""
        if "old" in runs and case in best["old"]:
            ratio = f" | {best['old'][case] / best['new'][case]:.2f}× " + (
                "faster" if best["old"][case] >= best["new"][case] else "slower")
        print(f"| {case} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
