"""The blocked CPU implementations, with hand-written gradients: stats.py (norm "none" / "stats") and batch.py
(norm "batch"). Small batches take reference.py's composition instead (the routing point decides)."""

import contextlib
import functools
import inspect

import torch

autocast_enabled = torch._C._is_any_autocast_enabled  # on any device, one C call


def without_autocast(fn, *args):
    """fn(*args) with autocast off on the CPU and CUDA, where it is on."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        return fn(*args)


def autocast_off(fn):
    """fn run with autocast off: the PyTorch path sums with torch.linalg.vecdot, which autocast runs in
    bfloat16 / float16. The routing point (ops/autocast.py) turns autocast off around a call; this guards
    what runs again outside that region — a backward called inside an autocast region, a compiled graph run
    inside one. Outside autocast it costs one C call (cpu/small.py's backwards, at B = 4, make that call
    themselves rather than through this wrapper's frame)."""

    @functools.wraps(fn)
    def run(*args):
        return without_autocast(fn, *args) if autocast_enabled() else fn(*args)

    # Its annotations resolved: torch.library infers the registered ops' schemas from a wrapped body's signature.
    run.__signature__ = inspect.signature(fn, eval_str=True)
    return run
