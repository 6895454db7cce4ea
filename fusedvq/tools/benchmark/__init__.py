"""`fusedvq bench`: the loss timed four ways, with a byte count, memory, and reports (JSON, Markdown, PNG).

    fusedvq bench [--device cpu|cuda] [--quick] [--out DIR]      (also: python -m fusedvq.tools.benchmark ...)

Providers (one step = the loss of x [B, D] against r [B, K], then its backward in mode forward+backward):
    fused      MaskedMSELoss on CUDA tensors (backend "auto"): the Triton kernels
    reference  MaskedMSELoss(backend="reference"): fusedvq's PyTorch path (what runs on the CPU)
    eager      the straightforward fix: F.mse_loss(((x - mean) / std)[:, mask], recon), statistics of all
               D columns, boolean-mask gather; norm="batch": the motivating project's normalization,
               nan_to_num → mean → unbiased std (σ < 1e-8 → 1) → normalize → nan_to_num (and fusedvq with
               nan_to_num=True, the same math)
    compiled   torch.compile(eager, dynamic=True), compiled once per norm, dtype and device
Modes: forward and forward+backward of the loss alone; columns, forward+backward of its per-column errors
(reduction="column") through their mean; clean+mse, the VQ-led step's loss: z = FeatureCleaner(x)
(the plain fix: the normalized masked features) and F.mse_loss(recon, z), forward+backward.

Timing: for each (B, dtype, norm, mode) the providers take turns, round after round, so the ratios between
them come from the same minutes of the same machine. A round runs n back-to-back steps and then
synchronizes the device, so a step's time is wall time, the CPU's dispatch overhead included; a cell
reports the median over its rounds and the fastest–slowest round. Two cells are compared by their medians
("N× faster" / "N× slower"), unless either's slowest round took more than NOISY_SPREAD times its fastest:
the machine was busy, and the report says "noisy: re-run on a quiet machine" instead of a ratio. GB/s divides bytes_moved() — the fewest bytes any implementation must
move — by that time; on CUDA it is also given as a fraction of the measured device-to-device copy rate.
On CUDA the cases the targets read (float32, norm="stats", forward+backward) also get each provider's
kernel time per step (torch.profiler: the device's own work, the host's overhead excluded), and the
bandwidth that time implies: what the kernels achieve, where the wall time may be the host's.
Memory: the bytes autograd saves for the backward beyond the inputs (any device), and on CUDA the peak
allocation of a step above the inputs (its gradients included). bench/ runs the same providers under
pytest-benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

# The package's public names (bench/, tests and `fusedvq bench` use them as fusedvq.tools.benchmark.NAME).
from .cases import D, DTYPES, K, MODES, NORMS, PROVIDERS, QUICK_SIZES, SIZES, Case, Inputs, bytes_moved
from .cases import make_inputs, make_statistics
from .load import busy_reason, machine_load, snapshot
from .runs import BUSY, NOISY, NOISY_SPREAD, Row, compare, is_noisy, matrix, run_case, speed_words, verdicts
from .runs import _error  # noqa: F401  (the tests read it)
from .providers import Unavailable, eager_loss, make_loss, make_step
from .report import environment, markdown, results_section, write_reports
from .timing import copy_bandwidth, kernel_seconds, kernel_totals, peak_bytes, saved_bytes, synchronize

__all__ = [
    "BUSY", "D", "K", "DTYPES", "MODES", "NORMS", "NOISY", "NOISY_SPREAD", "PROVIDERS", "QUICK_SIZES", "SIZES", "Case",
    "Inputs", "Row", "Unavailable", "add_arguments", "bytes_moved", "compare", "copy_bandwidth", "eager_loss",
    "busy_reason", "environment", "is_noisy", "machine_load", "snapshot", "speed_words",
    "kernel_seconds", "kernel_totals", "make_inputs", "make_loss", "make_statistics", "make_step", "markdown",
    "matrix", "peak_bytes", "results_section", "run", "run_case", "saved_bytes", "synchronize", "verdicts",
    "write_reports",
]


# ----------------------------------------------------------------------------------------------------- CLI


def _csv(kind, choices=None):
    def parse(text):
        values = tuple(kind(v) for v in text.split(",") if v)
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(map(str, choices))}"
                                             if choices else "expected a comma-separated list")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device,
                        help=f"where to run (default: {default_device})")
    parser.add_argument("--quick", action="store_true",
                        help=f"B in {','.join(map(str, QUICK_SIZES))}, float32, norm=stats, shorter timing")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for bench.json/.md/.png")
    parser.add_argument("--sizes", type=_csv(int), help=f"batch sizes (default {','.join(map(str, SIZES))})")
    parser.add_argument("--dtypes", type=_csv(str, DTYPES), help=f"default {','.join(DTYPES)}")
    parser.add_argument("--norms", type=_csv(str, NORMS), help=f"default {','.join(NORMS)}")
    parser.add_argument("--modes", type=_csv(str, MODES), help=f"default {','.join(MODES)}")
    parser.add_argument("--providers", type=_csv(str, PROVIDERS), help=f"default {','.join(PROVIDERS)}")
    parser.add_argument("--seconds-per-case", type=float,
                        help="timing budget of one (B, dtype, norm, mode), all providers (default 2, quick 1)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop starting new cases after this long (the rest are reported as skipped)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--results-section", nargs="+", type=Path, metavar="BENCH_JSON",
                        help="print the Results section of docs/benchmarks.md from these reports instead of "
                             "running (from the repository root: its links are relative to docs/)")


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (the options that were set)."""
    words = ["fusedvq bench", f"--device {args.device}"] + (["--quick"] if args.quick else [])
    for name in ("sizes", "dtypes", "norms", "modes", "providers"):
        if getattr(args, name):
            words.append(f"--{name} {','.join(map(str, getattr(args, name)))}")
    for name in ("seconds_per_case", "max_seconds"):
        if getattr(args, name) is not None:
            words.append(f"--{name.replace('_', '-')} {getattr(args, name):g}")
    return " ".join(words + [f"--out {args.out}"])


def run(args: argparse.Namespace) -> int:
    """Run the matrix (or print the Results section); 0 when it ran, 2 on bad usage."""
    if args.results_section:
        reports = [json.loads(p.read_text()) for p in args.results_section]
        folders = [Path(os.path.relpath(p.parent, "docs")).as_posix() for p in args.results_section]
        print(results_section(reports, folders), end="")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    dtypes = args.dtypes or (("float32",) if args.quick else DTYPES)
    norms = args.norms or (("stats",) if args.quick else NORMS)
    modes = args.modes or MODES
    providers = args.providers or PROVIDERS
    budget = args.seconds_per_case if args.seconds_per_case is not None else (1.0 if args.quick else 2.0)
    device = args.device
    if device == "cuda":
        torch.cuda.init()
    before = snapshot()  # other work on the machine: counted from here to the end of the run
    copy_rate = copy_bandwidth(device, nbytes=1 << 30 if device == "cuda" else 1 << 26)
    cases = matrix(sizes, dtypes, norms, modes)
    from tqdm import tqdm

    rows: list[Row] = []
    started = time.perf_counter()
    bar = tqdm(cases, desc="bench", unit="case", disable=args.no_progress, file=sys.stderr)
    for case in bar:
        bar.set_postfix_str(f"B={case.B} {case.dtype} {case.norm} {case.mode}")
        if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
            rows += [Row(p, case.B, case.D, case.K, case.dtype, case.norm, case.mode,
                         f"skipped: past --max-seconds {args.max_seconds:g}", bytes=bytes_moved(case))
                     for p in providers]
            continue
        rows += run_case(case, providers, device, budget, copy_rate if device == "cuda" else None)
    meta = {**environment(device, copy_rate, _command(args)), **machine_load(before, snapshot())}
    report = {"meta": meta, "rows": [asdict(r) for r in rows]}
    report["targets"] = verdicts(rows, device, busy_reason(meta))
    paths = write_reports(report, args.out)
    print(markdown(report), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedvq bench", description="Benchmark the fused loss.")
    add_arguments(parser)
    return run(parser.parse_args(argv))

