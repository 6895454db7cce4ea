"""Where a step's time goes, per provider: host time to issue it, device time of its kernels, and the top
operators by self time. Part of bench/gpu_check.sh (profile.txt); runs on the CPU too.

    python bench/profile_step.py [--device cuda|cpu] [--sizes 4,65536] [--providers fused,eager,compiled]

For each (provider, B), float32, norm="stats", forward+backward:
  wall   ms per step, n steps back to back then one synchronize (what the benchmark reports);
  issue  ms per step of host time with no synchronize inside the n steps: the CPU's cost of the step. When
         issue ≈ wall the step is bound by host overhead (Python, dispatch, autograd, launches); when
         wall > issue the device is the bottleneck;
  kernels  device time per step summed over its kernels (torch.profiler), and the launches per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fusedvq.tools import benchmark as fb


def _timed(step, device: str, n: int) -> tuple[float, float]:
    """(wall, issue) seconds per step over n steps."""
    for _ in range(3):
        step()
    fb.synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    issued = time.perf_counter()
    fb.synchronize(device)
    done = time.perf_counter()
    return (done - start) / n, (issued - start) / n


def _profiled(step, device: str, n: int, rows: int) -> tuple[str, float, float]:
    """(top operators table, device µs per step, kernel launches per step)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        fb.synchronize(device)
    events = prof.key_averages()
    seconds, launches = fb.kernel_totals(events, n)
    device_us = seconds * 1e6
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return events.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60), device_us, launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[4, 65536])
    parser.add_argument("--providers", type=lambda s: s.split(","), default=None)
    parser.add_argument("--rows", type=int, default=12, help="operators per table")
    args = parser.parse_args(argv)
    providers = args.providers or (["fused", "reference", "eager", "compiled"] if args.device == "cuda"
                                   else ["reference", "eager", "compiled"])
    summary = []
    for B in args.sizes:
        case = fb.Case(B, "float32", "stats", "forward+backward")
        inputs = fb.make_inputs(case, args.device)
        for provider in providers:
            try:
                step = fb.make_step(fb.make_loss(provider, case, args.device), inputs, case.mode)
                n = 200 if B <= 1024 else 20
                wall, issue = _timed(step, args.device, n)
                table, device_us, launches = _profiled(step, args.device, min(n, 20), args.rows)
            except Exception as err:  # report and go on: one provider must not hide the others
                summary.append(f"| {provider} | {B} | {fb._error(err)} | | | |")
                continue
            summary.append(f"| {provider} | {B} | {wall * 1e3:.4f} | {issue * 1e3:.4f} | {device_us / 1e3:.4f} "
                           f"| {launches:.0f} |")
            print(f"\n## {provider}, B = {B}: top operators over 20 steps\n\n{table}")
    print("\n## Summary (float32, norm=stats, forward+backward; ms per step)\n")
    print("| provider | B | wall | host issue | device (kernels) | launches |\n|---|---|---|---|---|---|")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
