"""Other work on the machine during a run: how many CPUs other processes kept busy, read from the kernel's
CPU counters before and after, beside the load averages and the threads torch used.

Why the rounds' spread is not enough: on a CPU whose cores are taken by another job, torch's parallel
regions wait on those cores in every round alike, so the rounds agree while one provider (the one with
more or larger parallel regions) slows more than another, and a ratio can turn around. So a run measures
the others' share itself:

    others = (Δ busy CPU-seconds of the whole machine − Δ CPU-seconds of this process) / Δ wall seconds

(/proc/stat's user, nice, system, irq, softirq and steal ticks; os.times() for this process). Where
`others` is half a CPU or more, or torch's threads do not fit the CPUs the others leave, the targets are
not ranked: the report says so and how to rerun. Without /proc/stat (not Linux) the load averages
before and after stand in.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

BUSY_LOAD = 0.5  # load average per CPU above which, without CPU counters, a run is called busy
BUSY_OTHERS = 0.5  # CPUs kept busy by other processes above which a run is called busy


def snapshot() -> dict:
    """The counters a run reads at its start and end."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = None
    own = os.times()
    return {"wall": time.perf_counter(), "busy_seconds": _machine_busy_seconds(), "cpus": cpus,
            "own_seconds": own.user + own.system, "load_average": load}


def _machine_busy_seconds() -> Optional[float]:
    """CPU-seconds all CPUs spent busy since boot (None where /proc/stat is not there)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_load(before: Optional[dict] = None, after: Optional[dict] = None) -> dict:
    """The report's record of other work: the load average at the start (and end), the CPUs this process
    may use, torch's threads, and (given both snapshots) the CPUs other processes kept busy in between."""
    before = before or snapshot()
    out = {"load_average": before["load_average"], "cpus": before["cpus"], "threads": torch.get_num_threads()}
    if after is not None:
        out["load_average_after"] = after["load_average"]
        wall = after["wall"] - before["wall"]
        if before["busy_seconds"] is not None and after["busy_seconds"] is not None and wall > 0:
            others = (after["busy_seconds"] - before["busy_seconds"]
                      - (after["own_seconds"] - before["own_seconds"])) / wall
            out["others_cpus"] = max(0.0, others)
    return out


def busy_reason(meta: dict) -> Optional[str]:
    """A sentence saying the machine was busy during the run and how to rerun, or None when it was not
    (or nothing was recorded)."""
    cpus, threads = meta.get("cpus"), meta.get("threads")
    if not cpus:
        return None
    others = meta.get("others_cpus")
    loads = [v for v in (meta.get("load_average"), meta.get("load_average_after")) if v is not None]
    if others is not None:
        oversubscribed = threads is not None and threads > cpus - others + BUSY_OTHERS
        if others < BUSY_OTHERS and not oversubscribed:
            return None
        what = f"other processes kept {others:.1f} of its {cpus} CPUs busy during the run"
    elif loads and max(loads) > BUSY_LOAD * cpus:
        others = max(loads)
        what = f"the 1-minute load average was {max(loads):.2f} on {cpus} CPUs"
    else:
        return None
    free = max(1, math.floor(cpus - others + 0.25))
    load = (" (load average " + " → ".join(f"{v:.2f}" for v in loads) + ")") if loads else ""
    uses = f", where torch used {threads} threads" if threads else ""
    return (f"the machine was busy: {what}{load}{uses}. Threads that wait on taken cores slow one provider "
            f"more than another even where the rounds agree, so the ratios are not ranked. Rerun on an idle "
            f"machine, or with OMP_NUM_THREADS={free} (the CPUs the other work leaves).")
