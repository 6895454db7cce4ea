"""The host work of a fused step at B = 4, on the CPU: everything a Triton forward+backward does but the
kernels themselves. The Triton path runs on CPU tensors (TRITON_INTERPRET=1 lets backend="triton" take
them) with every kernel launch replaced by a no-op (KernelLauncher.launch), so what is timed and counted
is fusedvq's Python, torch's dispatcher and the allocations of the outputs — what a GPU step pays on the
host before and between its launches.

    python bench/host_path.py [--against OTHER_CHECKOUT] [--rounds 3]

Per forward+backward: µs (the minimum over the rounds of the median of 2,000 steps), Python function calls
(sys.setprofile), dispatcher ops (a TorchDispatchMode), of which allocations (aten empty*/zeros*/new_*),
and launches. With --against, the same for another checkout, each in a fresh interpreter, alternating (the other
checkout imports the kernels of the installed fusedvq.kernels: give it a fusedvq/kernels link to its own
kernels/ folder).
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import checkouts  # noqa: E402

D, K, B = 187, 171, 4


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        name = func.__name__
        self.allocations += name.startswith(("empty", "zeros", "new_", "ones", "full"))
        return func(*args, **(kwargs or {}))


def measure() -> dict:
    import fusedvq
    from fusedvq.kernels import launchers

    launches = [0]

    def no_launch(self, grid, args, num_warps, **constexprs):
        launches[0] += 1

    launchers.KernelLauncher.launch = no_launch
    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D)[:K]] = True
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    x = torch.randn(B, D, requires_grad=True)
    r = torch.randn(B, K, requires_grad=True)
    loss_fn = fusedvq.MaskedMSELoss(mask, mean=mean, std=std, backend="triton")
    cleaner = fusedvq.FeatureCleaner(mask, norm="batch", backend="triton")
    steps = {
        "MaskedMSELoss stats": lambda: loss_fn(x, r).backward(),
        "masked_mse stats": lambda: fusedvq.masked_mse(x, r, mask, mean, std, backend="triton").backward(),
        "FeatureCleaner batch + mse": lambda: F.mse_loss(cleaner(x), r).backward(),
    }
    out = {}
    for name, step in steps.items():
        for _ in range(200):
            step()
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(400):
                step()
            rounds.append((time.perf_counter() - start) / 400 * 1e6)
        calls = [0]

        def profile(frame, event, arg):
            calls[0] += event == "call"

        sys.setprofile(profile)
        try:
            step()
        finally:
            sys.setprofile(None)
        counter, launches[0] = _Count(), 0
        with counter:  # (a step of its own: the mode's Python is not fusedvq's)
            step()
        out[name] = {"us": statistics.median(rounds), "python calls": calls[0], "dispatcher ops": counter.ops,
                     "allocations": counter.allocations, "launches": launches[0]}
    return out


def main() -> None:
    labelled = checkouts.run(__doc__.splitlines()[0], __file__, measure)
    if labelled is None:
        return
    results = {}
    for label, runs in labelled.items():
        results[label] = {case: {**runs[0][case], "us": min(run[case]["us"] for run in runs)} for case in runs[0]}
    print("| checkout | step | µs | Python calls | dispatcher ops | allocations | launches |")
    print("|---|---|---|---|---|---|---|")
    for label, rows in results.items():
        for case, row in rows.items():
            print(f"| {label} | {case} | {row['us']:.1f} | {row['python calls']} | {row['dispatcher ops']} | "
                  f"{row['allocations']} | {row['launches']} |")


if __name__ == "__main__":
    main()
