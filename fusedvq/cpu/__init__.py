"""The PyTorch path's implementations on the CPU, with hand-written gradients: the blocked passes, blocked.py
(norm "none" / "stats", and the blocks every pass shares) and batch.py (norm "batch", with moments.py, the
moments of its row blocks or of the ranks merged into one); small.py, the small-batch route's norm "batch"
forms (small batches of norm "none" / "stats" take reference.py's composition); hybrid.py, a hybrid
objective's embedding columns; partials.py and partials_small.py, P partial reconstructions against one
target. The routing point (ops/__init__.py) decides which runs."""

import contextlib

import torch

autocast_enabled = torch._C._is_any_autocast_enabled  # on any device, one C call


def without_autocast(fn, *args):
    """fn(*args) with autocast off on the CPU and CUDA, where it is on: the PyTorch path sums with
    torch.linalg.vecdot, which autocast runs in bfloat16 / float16. The routing point (ops/autocast.py)
    turns autocast off around a call; what runs again outside that region — a backward called inside an
    autocast region, a compiled graph run inside one — checks autocast_enabled() and comes here (cpu/small.py's
    backwards; the eager route, ops/__init__.py's EagerAutograd; the registered ops, ops/autograd.py's
    define_op)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        return fn(*args)
