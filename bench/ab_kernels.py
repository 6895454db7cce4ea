"""Today's kernels against each candidate, kernel time only, and the winner per case in TUNING's form.

    python bench/ab_kernels.py [--out ab_kernels.md]          (a CUDA device: triton.testing.do_bench)
    python bench/ab_kernels.py --dry-run                       (the CPU, Triton's interpreter, tiny sizes)

Cases: B = 4, 1024, 65536, 262144 (dry run: 4), float32 and bfloat16, D = 187, K = 171, reduction
mean, norm "stats" (where the candidates apply) and norm "batch" (today's kernels alone, for the
bandwidth verdicts). For each case the forward launch and the forward + backward launches are timed with
every value of each candidate switch (today's first), in turns, as device time (do_bench's median; L2
flushed between runs), with the bandwidth of the bytes the design must move (fusedvq.tools.benchmark's
byte model) against the measured copy bandwidth. It ends with verdict lines against the goals (the fused
forward + backward at >= 85% of the copy bandwidth at B = 65536) and one line per case and switch naming
the winner as the TUNING edit that would make it the default, e.g.

    TUNING.forward_loads = "rows"   # float32, stats, B = 65536: forward 0.051 ms vs 0.078 ms ("gather")

The dry run checks every path of the script and that both settings give the same loss; its times mean
nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

SIZES = (4, 1024, 65536, 262144)
DRY_SIZES = (4,)
# The candidate switches: TUNING field → its values, today's default first.
SWITCHES = {"forward_loads": ("gather", "rows")}
GOAL_OF_COPY = 0.85


def _timer(device: str, repeat: int = 3):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40)  # ms, median
    def cpu(fn):
        if repeat > 1:
            fn()  # warm-up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu


def _case(B: int, dtype: str, norm: str, device: str):
    from fusedvq.tools import benchmark as fb

    inputs = fb.make_inputs(fb.Case(B, dtype, norm, "forward+backward"), device)
    x, r = inputs.x.detach(), inputs.r.detach()
    kw = dict(mean=inputs.mean, std=inputs.std) if norm == "stats" else dict(nan_to_num=True)
    import fusedvq

    loss_fn = fusedvq.MaskedMSELoss(inputs.mask, norm=norm, backend="triton", **kw).to(device)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()

    def forward():
        with torch.no_grad():
            return loss_fn(x, r)

    def step():
        xg.grad = rg.grad = None
        loss_fn(xg, rg).backward()

    bytes_fwd = fb.bytes_moved(fb.Case(B, dtype, norm, "forward"))
    bytes_step = fb.bytes_moved(fb.Case(B, dtype, norm, "forward+backward"))
    return forward, step, bytes_fwd, bytes_step


def run(device: str, sizes, out=None, repeat: int = 3) -> int:
    from fusedvq.kernels import tiles
    from fusedvq.tools import benchmark as fb

    timer = _timer(device, repeat)
    copy = fb.copy_bandwidth(device, nbytes=1 << 30 if device == "cuda" else 1 << 24)
    default = dataclasses.replace(tiles.TUNING)
    lines = [f"copy bandwidth (read + write): {copy / 1e9:.0f} GB/s", "",
             "| case | setting | forward (ms) | forward GB/s (of copy) | fwd+bwd (ms) | fwd+bwd GB/s (of copy) |",
             "|---|---|---|---|---|---|"]
    winners, verdicts, failures = [], [], []
    for dtype in ("float32", "bfloat16"):
        for norm in ("stats", "batch"):
            for B in sizes:
                forward, step, bytes_fwd, bytes_step = _case(B, dtype, norm, device)
                case = f"{dtype}, {norm}, B = {B}"
                for field, values in SWITCHES.items():
                    if norm != "stats" and field == "forward_loads":
                        values = values[:1]  # the candidate covers norm "none" / "stats"
                    times, losses = {}, {}
                    for value in values:
                        setattr(tiles.TUNING, field, value)
                        try:
                            losses[value] = float(forward())
                            times[value] = (timer(forward), timer(step))
                        except Exception as err:  # recorded: the report says what failed, the rest still runs
                            failures.append(f"{case}, {field} = {value!r}: {type(err).__name__}: {err}"[:300])
                        finally:
                            setattr(tiles.TUNING, field, getattr(default, field))
                    for value, (fwd, full) in times.items():
                        lines.append(f"| {case} | {field} = {value!r} | {fwd:.4f} | "
                                     f"{bytes_fwd / fwd / 1e6:.0f} ({bytes_fwd / fwd / 1e6 / (copy / 1e9):.0%}) | "
                                     f"{full:.4f} | {bytes_step / full / 1e6:.0f} "
                                     f"({bytes_step / full / 1e6 / (copy / 1e9):.0%}) |")
                    ref = losses.get(values[0])
                    for value, loss in losses.items():
                        if ref is not None and abs(loss - ref) > 1e-5 * max(1.0, abs(ref)) * (100 if dtype != "float32" else 1):
                            failures.append(f"{case}: {field} = {value!r} gives loss {loss:.7g}, today's {ref:.7g}")
                    if len(times) > 1:
                        best = min(times, key=lambda v: times[v][0])
                        others = ", ".join(f"{times[v][0]:.4f} ms ({v!r})" for v in times if v != best)
                        winners.append(f"TUNING.{field} = {best!r}   # {case}: forward {times[best][0]:.4f} ms vs {others}")
                    if B == 65536 and norm == "stats" and times:
                        best_full = min(t[1] for t in times.values())
                        share = bytes_step / best_full / 1e6 / (copy / 1e9)
                        verdicts.append(f"{'MET' if share >= GOAL_OF_COPY else 'MISSED'}: {case} forward+backward at "
                                        f"{share:.0%} of the copy bandwidth (goal {GOAL_OF_COPY:.0%})")
    lines += ["", "## Verdicts", ""] + [f"- {v}" for v in verdicts]
    lines += ["", "## Winners, as the TUNING edit that makes each the default", "", "```"] + winners + ["```"]
    if failures:
        lines += ["", "## Failures", ""] + [f"- {f}" for f in failures]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if out:
        with open(out, "w") as f:
            f.write("# Today's kernels against the candidates (kernel time)\n\n" + text)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU through Triton's interpreter, tiny sizes")
    parser.add_argument("--out", help="also write the report here (markdown)")
    args = parser.parse_args(argv)
    if args.dry_run:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        return run("cpu", DRY_SIZES, args.out, repeat=1)  # each path once: the dry run's times mean nothing
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU")
        return 0
    return run("cuda", SIZES, args.out)


if __name__ == "__main__":
    sys.exit(main())
