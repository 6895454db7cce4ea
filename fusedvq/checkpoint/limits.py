"""How long and how much memory reading one file may take (Limits), the overrides of their base amounts
(FUSEDVQ_LOAD_SECONDS, FUSEDVQ_LOAD_MEMORY_MB, FUSEDVQ_LOAD_ISOLATION, each checked: a value it does not
accept is a CheckpointError saying what it accepts), and the limits set in the bounded child (isolation.py).

The child's address space may grow by `memory` bytes over its size at the fork, and never past the caller's
own address-space limit (a `ulimit -v` under a job scheduler): where that leaves less, the child gets what is
left, and a read stopped for memory says the budget was cut and by what.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional

from .errors import CheckpointError

BASE_SECONDS, MAX_SECONDS = 2.0, 86_400.0
BASE_MEMORY_MB, MAX_MEMORY_MB = 384.0, float(1 << 20)
ISOLATIONS = ("fork", "spawn")


def _setting(name: str, default: float, upper: float, unit: str) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= upper):
        raise CheckpointError([f"{name}={raw[:40]!r} is not a setting fusedvq accepts: it takes a number of {unit} "
                               f"greater than 0 and at most {upper:,.0f}, written as a plain decimal number "
                               f"(e.g. {name}={default:g}); unset it for the default"])
    return value


def isolation() -> str:
    """"fork" or "spawn": FUSEDVQ_LOAD_ISOLATION, checked (fork where there is no fork means spawn)."""
    raw = os.environ.get("FUSEDVQ_LOAD_ISOLATION", "").strip()
    if raw not in ("",) + ISOLATIONS:
        raise CheckpointError([f"FUSEDVQ_LOAD_ISOLATION={raw[:40]!r} is not a setting fusedvq accepts: it takes "
                               f"'fork' (the default where there is fork) or 'spawn' (a fresh interpreter); unset "
                               f"it for the default"])
    return "spawn" if raw == "spawn" or not hasattr(os, "fork") else "fork"


@dataclass(frozen=True)
class Limits:
    """How long and how much memory reading a file may take: `seconds` of wall clock, `memory` bytes more
    than the process held before (address space in the child; also the most the child may send back).
    `requested`: the memory asked for, when the caller's own address-space limit left only `memory`."""

    seconds: float
    memory: int
    requested: Optional[int] = None

    @classmethod
    def for_file(cls, size: int) -> "Limits":
        """2 s and 384 MiB, plus 1 s per 32 MiB and 6 bytes per byte of the file: a few hundred KB ends in
        about 2 s and well under 1 GB whatever it holds; an honest checkpoint reads at hundreds of MB/s.
        FUSEDVQ_LOAD_SECONDS / FUSEDVQ_LOAD_MEMORY_MB replace the base amounts; the memory is fitted under
        the caller's address-space limit."""
        seconds = _setting("FUSEDVQ_LOAD_SECONDS", BASE_SECONDS, MAX_SECONDS, "seconds") + size / (32 << 20)
        memory_mb = _setting("FUSEDVQ_LOAD_MEMORY_MB", BASE_MEMORY_MB, MAX_MEMORY_MB, "MiB")
        return cls(seconds, int(memory_mb * (1 << 20)) + 6 * size).fitted()

    def fitted(self) -> "Limits":
        """These limits with the memory cut to what the caller's address-space limit leaves above its size."""
        room = _room()
        if room is None or room >= self.memory:
            return self
        return replace(self, memory=max(room, 0), requested=self.memory)

    def words(self) -> str:
        """"2.0 s, 384 MiB more memory" (and what cut the memory, when something did)."""
        text = f"{self.seconds:.1f} s, {self.memory >> 20:,} MiB more memory"
        if self.requested is not None:
            text += (f" (cut from {self.requested >> 20:,} MiB: the process's address-space limit, ulimit -v, "
                     f"leaves no more)")
        return text


def _room() -> Optional[int]:
    """Bytes the address-space limit (soft) leaves above this process's size, or None without a limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = virtual_size()
    if soft == resource.RLIM_INFINITY or size is None:
        return None
    return soft - size


def limit_child(limits: Limits) -> None:
    """In the child: address space = its size + limits.memory (never past the limit it inherited), CPU time
    = what it used + limits.seconds."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: the wall clock is the bound
        return
    size = virtual_size()
    if size is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + limits.memory
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, soft)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap if hard == resource.RLIM_INFINITY else min(cap, hard)))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + limits.seconds) + 1
    _, hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)
    if hard_cpu != resource.RLIM_INFINITY:
        cpu = min(cpu, hard_cpu - 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def virtual_size() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - no procfs (macOS): only the wall clock bounds the child
        return None
    return None
