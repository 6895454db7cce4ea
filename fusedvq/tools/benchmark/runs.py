"""Running the matrix of cases side by side, and the targets each report is judged by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .cases import VQ_STEP_SIZES, Case, Inputs, bytes_moved, make_inputs
from .providers import Unavailable, eager_loss, make_loss, make_step
from .timing import kernel_seconds, peak_bytes, saved_bytes, time_side_by_side


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
    ms_min: Optional[float] = None  # the fastest round's time per step
    ms_max: Optional[float] = None  # the slowest round's
    rounds: int = 0
    bytes: int = 0  # bytes_moved()
    gbps: Optional[float] = None
    copy_fraction: Optional[float] = None  # gbps over the device's copy rate (CUDA)
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    device_ms: Optional[float] = None  # CUDA, target cases: kernel time per step (host overhead excluded)
    device_copy_fraction: Optional[float] = None  # bytes / device time, over the copy rate


# ------------------------------------------------------------------------------------- ranking two cells

# A cell's rounds spread from its fastest to its slowest. A quiet machine keeps the slowest round of a cell
# within about 1.5× its fastest (2 ms rounds on a 2-core CPU, 25 ms rounds on a GPU); other work on the
# machine slows some rounds, or every round of one provider (its rounds preempted, another's not), by more
# than the differences being ranked. So when either of two cells spread wider than NOISY_SPREAD, the pair is
# not ranked: the report says NOISY instead of a ratio that a re-run could turn around.
NOISY_SPREAD = 2.0
NOISY = "noisy: re-run on a quiet machine"
BUSY = "busy machine: not ranked"  # other processes took CPUs during the run (load.busy_reason)


def spread(row: "Row") -> Optional[float]:
    """The slowest round's time over the fastest's (None when the rounds were not recorded)."""
    if row.ms_min and row.ms_max:
        return row.ms_max / row.ms_min
    return None


def is_noisy(*rows: "Row") -> bool:
    """Whether any of these cells spread too wide for a ranking (NOISY_SPREAD)."""
    return any((spread(row) or 1.0) > NOISY_SPREAD for row in rows)


def speed_words(ratio: float) -> str:
    """ratio = the other's time over ours → "N× faster" (ratio ≥ 1) or "N× slower"; "as fast (1.00×)" when
    either would round to 1.00."""
    if f"{ratio:.2f}" == "1.00" and f"{1 / ratio:.2f}" == "1.00":
        return "as fast (1.00×)"
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def compare(ours: Optional["Row"], other: Optional["Row"]) -> str:
    """ours against other, from the medians ("1.91× faster", "1.09× slower"), NOISY when either cell's
    rounds spread too wide to rank them, "–" when either was not measured."""
    if not (ours and other and ours.ms and other.ms):
        return "–"
    return NOISY if is_noisy(ours, other) else speed_words(other.ms / ours.ms)


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
        row.ms, row.ms_min, row.ms_max = timing.median_s * 1e3, timing.min_s * 1e3, timing.max_s * 1e3
        row.rounds = timing.rounds
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
    """The cases, those the targets read first (norm="stats", float32, forward+backward), then the VQ-led
    step's (clean+mse, float32, B in VQ_STEP_SIZES), so that a run cut short by its time budget still has
    them."""
    cases = [Case(B, dtype, norm, mode) for norm in norms for dtype in dtypes for mode in modes for B in sizes]

    def order(c: Case):
        vq_step = c.mode == "clean+mse" and c.dtype == "float32" and c.B in VQ_STEP_SIZES
        return (not _is_target_case(c), not vq_step, c.norm != "stats", c.dtype != "float32",
                c.mode != "forward+backward")

    return sorted(cases, key=order)


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


def verdicts(rows: list[Row], device: str, busy: Optional[str] = None) -> list[dict]:
    """One entry per target of this device: the measured ratio, pass / miss (by how much), and for a miss
    why: the target's note, or on CUDA what the times say; NOISY instead of pass / miss when either cell's
    rounds spread too wide to rank them. The copy-bandwidth target is judged on the
    kernels' device time where it was measured (bandwidth is the kernels' property; the wall time also
    holds the host's overhead, reported beside it), else on wall time. busy: load.busy_reason of the run, when
the machine was busy: BUSY instead of pass / miss, with that sentence as the why."""
    out = []
    for t in TARGETS.get(device, ()):
        ours = _find(rows, t.ours, t.B)
        base = None if t.baseline == "copy" else _find(rows, t.baseline, t.B)
        name = (f"{t.ours} ≥ {t.at_least:g}× faster than {t.baseline}" if t.baseline != "copy"
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
                 "baseline_ms": base.ms if base else None, "ours_range_ms": _range(ours),
                 "baseline_range_ms": _range(base)}
        if measured is None:
            entry["verdict"] = "not measured"
        elif is_noisy(*(row for row in (ours, base) if row is not None)):
            entry["verdict"] = NOISY  # neither pass nor miss: the rounds cannot tell
        elif busy:
            entry["verdict"], entry["why"] = BUSY, busy  # neither: other work may have turned the ratio
        elif measured >= t.at_least:
            entry["verdict"] = "pass"
        else:
            entry["verdict"] = f"miss by {1 - measured / t.at_least:.0%}"
            entry["why"] = t.why_if_missed or _why_missed(t, ours)
        out.append(entry)
    return out


def _range(row: Optional[Row]) -> Optional[list[float]]:
    """[fastest, slowest] round of a cell, ms per step (None when not recorded)."""
    return [row.ms_min, row.ms_max] if row is not None and row.ms_min and row.ms_max else None


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
