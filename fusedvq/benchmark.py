"""`fusedvq bench`: the loss timed four ways, with a byte count, memory, and reports (JSON, Markdown, PNG).

    fusedvq bench [--device cpu|cuda] [--quick] [--out DIR]      (also: python -m fusedvq.benchmark ...)

Providers (one step = the loss of x [B, D] against r [B, K], then its backward in mode forward+backward):
    fused      MaskedMSELoss on CUDA tensors (backend "auto"): the Triton kernels
    reference  MaskedMSELoss(backend="reference"): fusedvq's PyTorch path (what runs on the CPU)
    eager      the straightforward fix: F.mse_loss(((x - mean) / std)[:, mask], recon), statistics of all
               D columns, boolean-mask gather (norm="batch": the batch's mean and std instead)
    compiled   torch.compile(eager, dynamic=True), compiled once per norm, dtype and device

Timing: for each (B, dtype, norm, mode) the providers take turns, round after round, so the ratios between
them come from the same minutes of the same machine. A round runs n back-to-back steps and then
synchronizes the device, so a step's time is wall time, the CPU's dispatch overhead included; a cell
reports the median over its rounds. GB/s divides bytes_moved() — the fewest bytes any implementation must
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
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

D, K = 187, 171  # the motivating VQ-VAE: 171 of 187 feature columns kept
SIZES = (4, 64, 1024, 16384, 65536, 262144)
QUICK_SIZES = (4, 64, 1024, 16384, 65536)
DTYPES = ("float32", "bfloat16")
NORMS = ("stats", "batch")
MODES = ("forward", "forward+backward")
PROVIDERS = ("fused", "reference", "eager", "compiled")
SEED = 0

# ---------------------------------------------------------------------------------------------- the problem


@dataclass(frozen=True)
class Case:
    """One cell of the matrix, less the provider."""

    B: int
    dtype: str
    norm: str
    mode: str
    D: int = D
    K: int = K


def bytes_moved(case: Case) -> int:
    """The fewest bytes one step must move through memory: each pass reads its inputs once and writes its
    outputs once, and only the K kept columns of x are read. Forward: x's kept columns and r (norm="batch"
    reads x's kept columns twice: the column statistics, then the loss). Backward: x's kept columns and r
    again, then grad_x [B, D] (zeros in the dropped columns included) and grad_r [B, K]."""
    e = torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    kept = case.B * case.K * e
    forward = kept * (2 if case.norm == "batch" else 1) + kept + e
    if case.mode == "forward":
        return forward
    return forward + 2 * kept + case.B * case.D * e + kept


@dataclass
class Inputs:
    mask: torch.Tensor  # [D] bool
    mean: torch.Tensor  # [D] float32
    std: torch.Tensor  # [D] float32
    x: torch.Tensor  # [B, D]
    r: torch.Tensor  # [B, K]


def make_statistics(device: str, d: int = D, k: int = K, seed: int = SEED):
    """(mask keeping k of d columns, mean [d], std [d]): the frozen VQ-VAE's side, the same for every B."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(d, dtype=torch.bool)
    mask[torch.randperm(d, generator=g)[:k]] = True
    mean = torch.randn(d, generator=g) * 2
    std = torch.rand(d, generator=g) * 2 + 0.25
    return mask.to(device), mean.to(device), std.to(device)


def make_inputs(case: Case, device: str, seed: int = SEED) -> Inputs:
    mask, mean, std = make_statistics(device, case.D, case.K, seed)
    g = torch.Generator(device=device).manual_seed(seed + case.B)
    dtype = getattr(torch, case.dtype)
    x = (torch.randn(case.B, case.D, generator=g, device=device) * std + mean).to(dtype).requires_grad_()
    r = torch.randn(case.B, case.K, generator=g, device=device).to(dtype).requires_grad_()
    return Inputs(mask, mean, std, x, r)


# ----------------------------------------------------------------------------------------------- providers

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Unavailable(Exception):
    """A provider that cannot run this case here (the message says why)."""


def eager_loss(mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, norm: str) -> LossFn:
    """The fix users write first: normalize all D columns, keep the masked ones, F.mse_loss."""
    if norm == "stats":

        def eager(x, r):
            return F.mse_loss(((x - mean) / std)[:, mask], r)

    else:

        def eager(x, r):
            return F.mse_loss(((x - x.mean(0)) / x.std(0))[:, mask], r)

    return eager


_compiled: dict[tuple, LossFn] = {}  # (norm, dtype, device, D, K) → the one compiled eager function


def make_loss(provider: str, case: Case, device: str) -> LossFn:
    """The provider's loss function for this case on this device; raises Unavailable if it cannot run."""
    import fusedvq
    from fusedvq.canonical import triton_importable

    mask, mean, std = make_statistics(device, case.D, case.K)
    if provider in ("fused", "reference"):
        if provider == "fused" and device != "cuda":
            raise Unavailable("the Triton kernels need a CUDA device")
        if provider == "fused" and not triton_importable():
            raise Unavailable("triton does not import")
        stats = (mean, std) if case.norm == "stats" else (None, None)
        # "auto" is Triton for CUDA tensors once triton imports (checked above), and it is what users get.
        backend = "auto" if provider == "fused" else "reference"
        try:
            return fusedvq.MaskedMSELoss(mask, *stats, norm=case.norm, backend=backend).to(device)
        except NotImplementedError as err:
            raise Unavailable(str(err)) from None
    # The straightforward fix holds its statistics in the features' dtype, as the rest of a bfloat16 model
    # does: float32 statistics would promote z to float32 against a bfloat16 target, which F.mse_loss's
    # CUDA backward rejects ("Found dtype BFloat16 but expected Float").
    mean, std = mean.to(getattr(torch, case.dtype)), std.to(getattr(torch, case.dtype))
    if provider == "eager":
        return eager_loss(mask, mean, std, case.norm)
    if provider == "compiled":
        key = (case.norm, case.dtype, device, case.D, case.K)
        if key not in _compiled:
            if not hasattr(torch, "compile"):
                raise Unavailable("torch.compile is not available in this torch")
            _compiled[key] = torch.compile(eager_loss(mask, mean, std, case.norm), dynamic=True)
        return _compiled[key]
    raise ValueError(f"unknown provider {provider!r}: expected one of {', '.join(PROVIDERS)}")


def make_step(loss_fn: LossFn, inputs: Inputs, mode: str) -> Callable[[], None]:
    x, r = inputs.x, inputs.r
    if mode == "forward":
        return lambda: loss_fn(x, r)

    def step():
        x.grad = r.grad = None
        loss_fn(x, r).backward()

    return step


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(loss_fn: LossFn, inputs: Inputs) -> int:
    """Bytes the autograd graph of one forward keeps for the backward beyond x and r themselves: tensors
    saved for backward, and tensors an autograd.Function keeps on its context (distinct storages)."""
    exclude = {inputs.x.untyped_storage().data_ptr(), inputs.r.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def count(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()

    def pack(t):
        count(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(inputs.x, inputs.r)
    nodes, visited = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for value in getattr(node, "__dict__", {}).values():  # a Python autograd.Function's context
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    count(t)
        nodes += [next_node for next_node, _ in node.next_functions]
    return sum(seen.values())


def peak_bytes(step: Callable[[], None], device: str, inputs: Inputs) -> Optional[int]:
    """CUDA only: the peak allocation during one step above the inputs (gradients of an earlier step are
    freed first, so the step's own gradients count)."""
    if device != "cuda":
        return None
    inputs.x.grad = inputs.r.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def kernel_totals(events, steps: int) -> tuple[float, float]:
    """(device seconds, kernel launches) per step, from torch.profiler's key_averages() over `steps` steps:
    the GPU's own work (kernels, memsets, copies), without the profiler's buffer bookkeeping."""
    device_events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                     and e.key != "Activity Buffer Request"]
    seconds = sum(e.self_device_time_total for e in device_events) / 1e6 / steps
    return seconds, sum(e.count for e in device_events) / steps


def kernel_seconds(step: Callable[[], None], device: str, steps: int = 10) -> Optional[float]:
    """CUDA only: device time of one step (its kernels summed), host overhead excluded: what the step
    would take if the host kept the GPU busy. Measured with torch.profiler over `steps` steps."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return kernel_totals(prof.key_averages(), steps)[0]


def copy_bandwidth(device: str, nbytes: int = 1 << 28, rounds: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median of rounds)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 2:  # warm-up: first touches, clocks
            times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


@dataclass
class Timing:
    median_s: float
    min_s: float
    rounds: int
    steps_per_round: int


# A round's length. On CUDA each round ends in a synchronize, whose cost must vanish in the round as it
# does in a training loop that never synchronizes: on an H200 host, 2 ms rounds timed the fused B = 4 step
# at 0.65 ms where 200 steps and one synchronize (bench/profile_step.py) took 0.30 ms.
ROUND_SECONDS = {"cpu": 2e-3, "cuda": 25e-3}


def time_side_by_side(steps: dict[str, Callable[[], None]], device: str, budget_s: float,
                      min_rounds: int = 5, max_rounds: int = 50, round_s: Optional[float] = None
                      ) -> dict[str, Timing]:
    """Per-step times of several steps measured in turns: round i of every step before round i + 1 of any.

    Each step is first run twice (compilation, first touches, allocator warm-up); a round then runs it n
    times back to back, n chosen so a round lasts about round_s, and synchronizes. Rounds continue until
    budget_s is spent (at least min_rounds, at most max_rounds)."""
    round_s = round_s if round_s is not None else ROUND_SECONDS[device]
    per_round = {}
    for name, step in steps.items():
        synchronize(device)
        start = time.perf_counter()
        step()
        step()
        synchronize(device)
        once = (time.perf_counter() - start) / 2
        per_round[name] = max(1, min(1000, int(round_s / max(once, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    for i in range(max_rounds):
        if i >= min_rounds and time.perf_counter() - started > budget_s:
            break
        for name, step in steps.items():
            n = per_round[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                step()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: Timing(statistics.median(s), min(s), len(s), per_round[name]) for name, s in samples.items()}


# ------------------------------------------------------------------------------------------------ the matrix


@dataclass
class Row:
    provider: str
    B: int
    D: int
    K: int
    dtype: str
    norm: str
    mode: str
    status: str  # "ok", or why the provider did not run
    ms: Optional[float] = None  # median per step
    ms_min: Optional[float] = None
    rounds: int = 0
    bytes: int = 0  # bytes_moved()
    gbps: Optional[float] = None
    copy_fraction: Optional[float] = None  # gbps over the device's copy rate (CUDA)
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    device_ms: Optional[float] = None  # CUDA, target cases: kernel time per step (host overhead excluded)
    device_copy_fraction: Optional[float] = None  # bytes / device time, over the copy rate


def run_case(case: Case, providers: tuple[str, ...], device: str, budget_s: float,
             copy_rate: Optional[float]) -> list[Row]:
    """Every provider on one case, timed side by side."""
    rows, steps, losses = {}, {}, {}
    nbytes = bytes_moved(case)
    for provider in providers:
        row = Row(provider, case.B, case.D, case.K, case.dtype, case.norm, case.mode, "ok", bytes=nbytes)
        rows[provider] = row
        try:
            losses[provider] = make_loss(provider, case, device)
        except Unavailable as err:
            row.status = f"unavailable: {err}"
        except Exception as err:  # a provider that cannot even be built must not sink the matrix
            row.status = _error(err)
    inputs = make_inputs(case, device) if losses else None
    expected = _eager_value(case, inputs) if losses else None
    for provider, loss_fn in losses.items():
        try:
            steps[provider] = make_step(loss_fn, inputs, case.mode)
            steps[provider]()  # compiles, and surfaces errors before the timing starts
            if provider in ("fused", "reference"):  # a fast wrong answer is no result: check it first
                _check_value(loss_fn(inputs.x, inputs.r), expected, case)
            if provider != "compiled":  # hooks would be traced into (and recompile) the compiled function
                rows[provider].saved_bytes = saved_bytes(loss_fn, inputs)
            rows[provider].peak_bytes = peak_bytes(steps[provider], device, inputs)
        except Exception as err:  # a provider that breaks on one case must not sink the matrix
            rows[provider].status = _error(err)
            steps.pop(provider, None)
    for provider, timing in time_side_by_side(steps, device, budget_s).items():
        row = rows[provider]
        row.ms, row.ms_min, row.rounds = timing.median_s * 1e3, timing.min_s * 1e3, timing.rounds
        row.gbps = nbytes / timing.median_s / 1e9
        if copy_rate:
            row.copy_fraction = row.gbps * 1e9 / copy_rate
    if device == "cuda" and _is_target_case(case):
        for provider, step in steps.items():  # after the timing: the profiler must not disturb it
            try:
                seconds = kernel_seconds(step, device)
            except Exception:  # a profiler that cannot start leaves the column empty, not the matrix
                continue
            row = rows[provider]
            row.device_ms = seconds * 1e3
            if copy_rate and seconds:
                row.device_copy_fraction = nbytes / seconds / copy_rate
    return list(rows.values())


def _is_target_case(case: Case) -> bool:
    return (case.dtype, case.norm, case.mode) == ("float32", "stats", "forward+backward")


def _eager_value(case: Case, inputs: Inputs) -> float:
    """The loss of this case by the eager composition in float64: what every provider must return."""
    x, r = inputs.x.detach().double(), inputs.r.detach().double()
    with torch.no_grad():
        return float(eager_loss(inputs.mask, inputs.mean.double(), inputs.std.double(), case.norm)(x, r))


def _check_value(loss: torch.Tensor, expected: float, case: Case) -> None:
    """Raise if a provider's loss is off the float64 value by more than its dtype's rounding allows."""
    tolerance = 1e-4 if case.dtype == "float32" else 2e-2
    got = float(loss.detach().double())
    if not abs(got - expected) <= tolerance * abs(expected):
        raise ValueError(f"loss {got:.6g} differs from the float64 value {expected:.6g} by more than "
                         f"{tolerance:g} relative")


def _error(err: Exception) -> str:
    return f"error: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def matrix(sizes, dtypes, norms, modes) -> list[Case]:
    """The cases, those the targets read first (norm="stats", float32, forward+backward), so that a run cut
    short by its time budget still has them."""
    cases = [Case(B, dtype, norm, mode) for norm in norms for dtype in dtypes for mode in modes for B in sizes]
    return sorted(cases, key=lambda c: (c.norm != "stats", c.dtype != "float32", c.mode != "forward+backward"))


# --------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """ours is at least `at_least` times faster than baseline (or, baseline "copy", at that fraction of the
    copy rate) on forward+backward, float32, norm="stats", at batch size B."""

    B: int
    ours: str
    baseline: str
    at_least: float
    why_if_missed: str = ""


_FRESH_OUTPUTS = ("a step first-touches two batch-sized buffers (diff [B, K], which becomes grad_r, and grad_x "
                  "[B, D]); their page faults are about half of the reference path's step on a CPU (eager pays "
                  "the same for each of its ~8 such buffers), and the rest is one pass over x and r")
TARGETS = {
    "cpu": (
        Target(65536, "reference", "eager", 3.0, _FRESH_OUTPUTS),
        Target(65536, "reference", "compiled", 2.0, _FRESH_OUTPUTS),
        Target(4, "reference", "eager", 2.0,
               "at B = 4 a step is per-call overhead, not arithmetic: autograd's engine plus a few µs of Python "
               "and dispatch per op, on both sides; eager runs about as many ops, so no path through autograd "
               "can be twice as fast"),
    ),
    "cuda": (
        Target(65536, "fused", "eager", 10.0),
        Target(65536, "fused", "compiled", 1.5),
        Target(65536, "fused", "copy", 0.8),
        Target(4, "fused", "eager", 5.0),
        Target(4, "fused", "compiled", 2.0),
    ),
}


def _find(rows: list[Row], provider: str, B: int) -> Optional[Row]:
    for row in rows:
        if (row.provider, row.B, row.dtype, row.norm, row.mode) == (provider, B, "float32", "stats",
                                                                     "forward+backward") and row.ms:
            return row
    return None


def verdicts(rows: list[Row], device: str) -> list[dict]:
    """One entry per target of this device: the measured ratio, pass / miss (by how much), and for a miss
    why: the target's note, or on CUDA what the times say. The copy-bandwidth target is judged on the
    kernels' device time where it was measured (bandwidth is the kernels' property; the wall time also
    holds the host's overhead, reported beside it), else on wall time."""
    out = []
    for t in TARGETS.get(device, ()):
        ours = _find(rows, t.ours, t.B)
        base = None if t.baseline == "copy" else _find(rows, t.baseline, t.B)
        name = (f"{t.ours} ≥ {t.at_least:g}× {t.baseline}" if t.baseline != "copy"
                else f"{t.ours} ≥ {t.at_least:.0%} of copy bandwidth") + f" at B = {t.B}"
        if t.baseline == "copy":
            on_device = ours is not None and ours.device_copy_fraction is not None
            measured = (ours.device_copy_fraction if on_device else ours.copy_fraction) if ours else None
            if on_device:
                name += " (kernel time)"
        else:
            measured = base.ms / ours.ms if (ours and base) else None
        entry = {"target": name, "B": t.B, "ours": t.ours, "baseline": t.baseline, "at_least": t.at_least,
                 "measured": measured, "ours_ms": ours.ms if ours else None,
                 "baseline_ms": base.ms if base else None}
        if measured is None:
            entry["verdict"] = "not measured"
        elif measured >= t.at_least:
            entry["verdict"] = "pass"
        else:
            entry["verdict"] = f"miss by {1 - measured / t.at_least:.0%}"
            entry["why"] = t.why_if_missed or _why_missed(t, ours)
        out.append(entry)
    return out


def _why_missed(t: Target, ours: Row) -> str:
    """What bounds our step, from its wall time, its kernels' device time and the copy rate."""
    if ours.device_ms is not None and ours.device_copy_fraction is not None:
        kernels = (f"its kernels take {ours.device_ms:.3g} ms of the {ours.ms:.3g} ms step and move its bytes at "
                   f"{ours.device_copy_fraction:.0%} of the copy rate")
        if t.baseline == "copy":
            return f"{kernels}: the kernels, not the host, fall short of the copy rate"
        if ours.device_ms < 0.5 * ours.ms:
            return f"host-bound: {kernels}; the rest is host work (Python, autograd, launches) per step"
        return f"{kernels}: the kernels bound the step"
    if ours.copy_fraction is None:
        return ""
    bound = ("bandwidth-bound, so the gap is the baseline's own efficiency" if ours.copy_fraction >= 0.6
             else "far from it: per-step overhead (host code, launches, allocation) bounds the step")
    return f"{t.ours} moves its bytes at {ours.copy_fraction:.0%} of the copy rate, {bound}"


# --------------------------------------------------------------------------------------------------- reports


def environment(device: str, copy_rate: Optional[float], command: str) -> dict:
    cpu = f"{_cpu_model()} ({torch.get_num_threads()} threads)"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu,
        "host_cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "copy_bandwidth_gbps": copy_rate / 1e9 if copy_rate else None,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    return meta


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if v < 1000 else f"{v:,.0f}"


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def ours_provider(device: str) -> str:
    return "fused" if device == "cuda" else "reference"


def _display_order(key: tuple[str, str, str]) -> list[int]:
    """Sort key of a (norm, dtype, mode) group: the order of NORMS, DTYPES and MODES."""
    return [seq.index(v) if v in seq else len(seq) for seq, v in zip((NORMS, DTYPES, MODES), key)]


def markdown(report: dict) -> str:
    meta, rows = report["meta"], [Row(**r) for r in report["rows"]]
    ours = ours_provider(meta["device"])
    providers = [p for p in PROVIDERS if any(r.provider == p for r in rows)]
    lines = [
        f"# fusedvq benchmark: {meta['device_name']}",
        "",
        f"`{meta['command']}` · {meta['date']} · torch {meta['torch']} · triton {meta['triton'] or '–'} · "
        f"D = {rows[0].D if rows else D}, K = {rows[0].K if rows else K}",
        "",
        "Milliseconds per step (median over rounds, providers timed in turns); "
        f"ratios are the other provider's time over {ours}'s.",
    ]
    if meta.get("copy_bandwidth_gbps"):
        lines.append(f"Device copy bandwidth (read + write): {meta['copy_bandwidth_gbps']:.0f} GB/s.")
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.norm, row.dtype, row.mode), []).append(row)
    for (norm, dtype, mode), group in sorted(groups.items(), key=lambda item: _display_order(item[0])):
        by = {(r.provider, r.B): r for r in group}
        unavailable = sorted({f"{r.provider} ({r.status})" for r in group if r.status != "ok"})
        lines += ["", f"## norm={norm}, {dtype}, {mode}", ""]
        head = ["B"] + providers + [f"eager / {ours}", f"compiled / {ours}", f"{ours} GB/s",
                                    f"saved for backward: {ours} / eager"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for B in sorted({r.B for r in group}):
            o, e, c = by.get((ours, B)), by.get(("eager", B)), by.get(("compiled", B))
            cells = [str(B)] + [_ms(by[(p, B)].ms) if (p, B) in by else "–" for p in providers]
            cells.append(f"{e.ms / o.ms:.2f}×" if o and e and o.ms and e.ms else "–")
            cells.append(f"{c.ms / o.ms:.2f}×" if o and c and o.ms and c.ms else "–")
            gbps = f"{o.gbps:.1f}" if o and o.gbps else "–"
            if o and o.copy_fraction:
                gbps += f" ({o.copy_fraction:.0%} of copy)"
            if o and o.device_ms and o.device_copy_fraction is not None:
                gbps += (f"; kernels {o.device_ms:.3g} ms, {o.bytes / o.device_ms / 1e6:.0f} GB/s "
                         f"({o.device_copy_fraction:.0%} of copy)")
            cells.append(gbps)
            saved = f"{_bytes(o.saved_bytes) if o else '–'} / {_bytes(e.saved_bytes) if e else '–'}"
            if mode == "forward":
                saved = "–"
            cells.append(saved)
            lines.append("| " + " | ".join(cells) + " |")
        if unavailable:
            lines += ["", "Not run: " + "; ".join(unavailable) + "."]
    if any(r.peak_bytes is not None for r in rows):
        lines += ["", "## Peak CUDA memory of a step above the inputs (forward+backward)", "",
                  "| B | dtype | norm | " + " | ".join(providers) + " |", "|---|---|---|" + "---|" * len(providers)]
        keys = sorted({(r.B, r.dtype, r.norm) for r in rows if r.mode == "forward+backward"})
        for B, dtype, norm in keys:
            cells = [_bytes(next((r.peak_bytes for r in rows if (r.provider, r.B, r.dtype, r.norm, r.mode) ==
                                  (p, B, dtype, norm, "forward+backward")), None)) for p in providers]
            lines.append(f"| {B} | {dtype} | {norm} | " + " | ".join(cells) + " |")
    if report.get("targets"):
        lines += ["", "## Targets (forward+backward, float32, norm=stats)", "",
                  "| target | ms per step (ours / baseline) | measured | verdict |", "|---|---|---|---|"]
        for t in report["targets"]:
            m = t["measured"]
            shown = "–" if m is None else (f"{m:.0%}" if t["baseline"] == "copy" else f"{m:.2f}×")
            times = f"{_ms(t.get('ours_ms'))} / {_ms(t.get('baseline_ms'))}"
            verdict = t["verdict"] + (f" — {t['why']}" if t.get("why") else "")
            lines.append(f"| {t['target']} | {times} | {shown} | {verdict} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Time per step against B, log–log, one line per provider; one panel per (norm, dtype, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, rows = report["meta"], [Row(**r) for r in report["rows"]]
    panels = sorted({(r.norm, r.dtype, r.mode) for r in rows if r.ms}, key=_display_order)  # measured ones
    cols = min(2, max(1, len(panels)))
    nrows = math.ceil(len(panels) / cols) if panels else 1
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, (norm, dtype, mode) in zip(axes.flat, panels):
        for provider in PROVIDERS:
            pts = sorted((r.B, r.ms) for r in rows if (r.provider, r.norm, r.dtype, r.mode) ==
                         (provider, norm, dtype, mode) and r.ms)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        sizes = sorted({r.B for r in rows})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("ms per step")
        ax.set_title(f"norm={norm}, {dtype}, {mode}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"fusedvq loss, time per step: {meta['device_name']}, torch {meta['torch']}\n{meta['command']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if nrows > 1 else 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """bench.json, bench.md and bench.png in out (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def results_section(reports: list[dict], folders: list[str]) -> str:
    """The README's "Results" section from reports (one per device): for each, the device, the command
    that produced it, the headline table (norm="stats", float32, forward+backward), the targets and the
    plot; folders[i] is where report i's bench.md and bench.png live, relative to the README."""
    lines = ["## Results", ""]
    for report, folder in zip(reports, folders):
        meta = report["meta"]
        md = markdown(report).splitlines()
        lines += [f"### {meta['device_name']}", "",
                  f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, triton {meta['triton'] or '–'}"
                  + (f", copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s" if meta.get("copy_bandwidth_gbps")
                     else "") + f". Every table: [{folder}/bench.md]({folder}/bench.md).", ""]
        for title in ("## norm=stats, float32, forward+backward", "## Targets"):
            start = next((i for i, line in enumerate(md) if line.startswith(title)), None)
            if start is None:
                continue
            end = next((i for i in range(start + 1, len(md)) if md[i].startswith("## ")), len(md))
            lines += ["#### " + md[start][3:]] + md[start + 1 : end]
        lines += ["", f"![ms per step against B on {meta['device_name']}, from `{meta['command']}`]"
                      f"({folder}/bench.png)", ""]
    return "\n".join(lines) + "\n"


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
                        help="print the README's Results section from these reports instead of running")


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
        print(results_section(reports, [p.parent.as_posix() for p in args.results_section]), end="")
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
    report = {"meta": environment(device, copy_rate, _command(args)), "rows": [asdict(r) for r in rows]}
    report["targets"] = verdicts(rows, device)
    paths = write_reports(report, args.out)
    print(markdown(report), end="")
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedvq bench", description="Benchmark the fused loss.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
