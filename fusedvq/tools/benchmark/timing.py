"""Measuring: side-by-side rounds, kernel time, saved and peak memory, copy bandwidth."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .cases import Inputs
from .providers import LossFn


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
    max_s: float
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
    return {name: Timing(statistics.median(s), min(s), max(s), len(s), per_round[name]) for name, s in samples.items()}
