"""The blocked CPU implementations, with hand-written gradients: stats.py (norm "none" / "stats") and batch.py
(norm "batch"). Small batches take reference.py's composition instead (the routing point decides)."""

import contextlib

import torch

autocast_enabled = torch._C._is_any_autocast_enabled  # on any device, one C call


def without_autocast(fn, *args):
    """fn(*args) with autocast off on the CPU and CUDA, where it is on: the PyTorch path sums with
    torch.linalg.vecdot, which autocast runs in bfloat16 / float16. The routing point (ops/autocast.py)
    turns autocast off around a call; what runs again outside that region — a backward called inside an
    autocast region, a compiled graph run inside one — checks autocast_enabled() and comes here (cpu/small.py's
    backwards; ops/loss.py's autocast_off for the registered ops' implementations)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        return fn(*args)
