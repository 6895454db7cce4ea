"""The CPU ratios of norm="batch", side by side in one process: forward+backward, float32, D = 187, K = 171,
MaskedMSELoss(norm="batch", nan_to_num=True) and FeatureCleaner(norm="batch", nan_to_num=True) + F.mse_loss
against the plain fix (nan_to_num → mean → unbiased std, σ < eps → 1 → normalize → nan_to_num → x[:, mask]
→ F.mse_loss), both on the reference backend, in alternating rounds (median of 5):

    python bench/vq_step_cpu.py [B ...]          (default: 4 1024 65536)

Also prints the dispatcher ops each step runs at the first B (what bounds small batches: per-op overhead).
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fusedvq

D, K = 187, 171


def plain_z(x, mask, eps=1e-8):
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    std = x.std(0)
    z = (x - x.mean(0)) / torch.where(std < eps, torch.ones_like(std), std)
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)[:, mask]


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def main(sizes):
    torch.manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D)[:K]] = True
    loss = fusedvq.MaskedMSELoss(mask, norm="batch", nan_to_num=True, backend="reference")
    cleaner = fusedvq.FeatureCleaner(mask, norm="batch", nan_to_num=True, backend="reference")
    steps = {
        "plain loss": lambda x, r: F.mse_loss(plain_z(x, mask), r),
        "fusedvq loss": loss,
        "plain clean+mse": lambda x, r: F.mse_loss(r, plain_z(x, mask)),
        "fusedvq clean+mse": lambda x, r: F.mse_loss(r, cleaner(x)),
    }

    def timed(fn, x, r, n):
        start = time.perf_counter()
        for _ in range(n):
            x.grad = r.grad = None
            fn(x, r).backward()
        return (time.perf_counter() - start) / n

    for i, B in enumerate(sizes):
        x = (torch.randn(B, D) * 3 + 1).requires_grad_()
        r = torch.randn(B, K).requires_grad_()
        n = max(2, int(2e5 / B))
        times = {name: [] for name in steps}
        for _ in range(2):  # warm-up
            for fn in steps.values():
                timed(fn, x, r, 2)
        for _ in range(5):
            for name, fn in steps.items():
                times[name].append(timed(fn, x, r, n))
        med = {name: sorted(t)[2] * 1e3 for name, t in times.items()}
        print(f"B={B}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in med.items())
              + f" | loss {med['plain loss'] / med['fusedvq loss']:.2f}x, clean+mse "
              f"{med['plain clean+mse'] / med['fusedvq clean+mse']:.2f}x")
        if i == 0:
            for name, fn in steps.items():
                forward, backward = _CountOps(), _CountOps()
                with forward:
                    out = fn(x, r)
                with backward:
                    out.backward()
                print(f"  B={B} {name}: {forward.count} dispatcher ops forward, {backward.count} backward")


if __name__ == "__main__":
    main([int(b) for b in sys.argv[1:]] or [4, 1024, 65536])
