"""P partial reconstructions against one target on the GPU (issue 28, item 3): kernel time of the partials'
forward and backward kernels, and the step (the target cleaned, then the P partials' loss, forward +
backward) of fusedvq.PartialsMSELoss against the project's eager loop, in the same run.

    python bench/partials_gpu.py [--device cuda] [--partials 24] [--sizes 4,1024,65536] [--out partials.md]

float32, D = 187, K = 171, norm "stats"; the features and every partial require grad. Kernel times are
triton.testing.do_bench medians with GB/s from an explicit byte count (forward: the partials and z read;
backward: those read again, grad_partials and grad_z written). Steps: "fused [P, B, K]" takes the partials as
one tensor, "fused list" as the list a model returns (stacked inside), "loop" is
sum(F.mse_loss(p, target) for p in partials) / P on target = ((x − μ)/σ)[:, kept]. --device cpu (the GPU
check's dry run: --sizes 4) times a few rounds with perf_counter, through the PyTorch path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fusedvq

D, K = 187, 171


def make(B: int, P: int, device: str):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=g)[:K]] = True
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    x = torch.randn(B, D, generator=g)
    partials = torch.randn(P, B, K, generator=g)
    return [t.to(device) for t in (mask, mean, std, x, partials)]


def timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    def cpu(fn):
        fn()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return cpu


def kernel_rows(B: int, P: int, device: str, measure) -> list[str]:
    """Kernel time (µs) and GB/s of the forward and backward kernels (CUDA only)."""
    if device != "cuda":
        return []
    from fusedvq.kernels import partials as kp
    from fusedvq.kernels.plan import NO_GAP, REDUCTION_MEAN

    _, _, _, _, r = make(B, P, device)
    z = torch.randn(B, K, device=device)
    grad = torch.ones((), device=device)
    fwd = measure(lambda: kp.partials_forward(z, r, REDUCTION_MEAN, NO_GAP))
    bwd = measure(lambda: kp.partials_backward(grad, z, r, REDUCTION_MEAN, NO_GAP, (True, True)))
    read = 4 * (P * B * K + B * K)
    return [f"| {B} | forward kernel | {fwd * 1e6:.1f} | {read / fwd / 1e9:.0f} |",
            f"| {B} | backward kernel | {bwd * 1e6:.1f} | {2 * read / bwd / 1e9:.0f} |"]


def step_times(B: int, P: int, device: str, measure) -> dict:
    mask, mean, std, x, stacked = make(B, P, device)
    x.requires_grad_()
    stacked.requires_grad_()
    listed = [p.detach().clone().requires_grad_() for p in stacked]
    fn = fusedvq.PartialsMSELoss(mask, mean, std).to(device)
    kept = mask.nonzero().squeeze(1)

    def loop():
        target = ((x - mean) / std).index_select(1, kept)
        (sum(F.mse_loss(p, target) for p in listed) / P).backward()

    def fused(given):
        def step():
            fn(x, given).backward()
        return step

    return {"loop": measure(loop), "fused [P, B, K]": measure(fused(stacked)), "fused list": measure(fused(listed))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--partials", type=int, default=24)
    parser.add_argument("--sizes", default=None, help="comma-separated B (default 4,1024,65536; cpu 4,64)")
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return
    sizes = [int(s) for s in (args.sizes or ("4,1024,65536" if args.device == "cuda" else "4,64")).split(",")]
    measure, P = timer(args.device), args.partials
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    lines = [f"## P = {P} partials against one target ({name}, float32, D = {D}, K = {K})", "",
             "| B | kernel | µs | GB/s |", "|---:|---|---:|---:|"]
    steps = ["", "| B | loop µs | fused [P, B, K] µs | fused list µs | loop / fused [P, B, K] | loop / fused list |",
             "|---:|---:|---:|---:|---:|---:|"]
    for B in sizes:
        lines += kernel_rows(B, P, args.device, measure)
        t = step_times(B, P, args.device, measure)
        steps.append(f"| {B} | {t['loop'] * 1e6:.1f} | {t['fused [P, B, K]'] * 1e6:.1f} | {t['fused list'] * 1e6:.1f} "
                     f"| {t['loop'] / t['fused [P, B, K]']:.2f}× | {t['loop'] / t['fused list']:.2f}× |")
    text = "\n".join(lines + steps) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
