"""Autocast at the routing point. Under torch.autocast on the features' device a fusedvq call behaves as
F.mse_loss does (it is on autocast's float32 list): what autocast does for such an op is done once here,
before the routing —

    floating inputs other than float64 are cast to float32 (differentiable casts: the gradients come back
    to each input in its own dtype), and a float64 input promotes the other (F.mse_loss's type promotion);
    the call then runs with autocast off on that device,

so every path inside (the small-batch route, the composition, the blocked CPU passes, the registered ops
and the Triton kernels) sees inputs of one dtype and computes in float32 with no low-precision intermediate
(torch.linalg.vecdot, which sums the batch statistics and the loss on the CPU, is on autocast's
lower-precision list), and the result is float32 (float64 where an input is). What runs again outside this
region — a backward called inside the autocast region, a compiled graph run inside one — turns autocast
off itself where it matters: the registered ops' implementations, the eager route (EagerAutograd) and
cpu/small.py's backwards (cpu.without_autocast); the Triton launchers run no op that autocast changes. Outside autocast,
features and a target of two dtypes remain an error (ops.check_pair), and a call pays one C call
(`enabled`) for all this."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..cpu import autocast_enabled as enabled  # (on any device: the routing point's one check outside autocast)

_KEPT = (torch.float32, torch.float64)


def active(features) -> bool:
    """Whether autocast is on for the features' device (a call with features of another type takes the
    routing point's own checks)."""
    return isinstance(features, Tensor) and torch.is_autocast_enabled(features.device.type)


def _float32(t):
    """autocast's float32 policy for one input: a floating tensor other than float64 becomes float32."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype not in _KEPT:
        return t.float()
    return t


def call(fn, tensors: tuple, *rest, **named):
    """fn(*tensors, *rest, **named) with autocast's float32 policy applied to the tensors ((features, target)
    or (features,)) and the named ones (a hybrid's embeddings; None passes as it is), autocast off on the
    features' device."""
    cast = [_float32(t) for t in (*tensors, *named.values())]
    floating = [t.dtype for t in cast if isinstance(t, Tensor) and t.is_floating_point()]
    if any(d != floating[0] for d in floating):
        wide = functools.reduce(torch.promote_types, floating)  # float64 with float32: float64
        cast = [t.to(wide) if isinstance(t, Tensor) and t.is_floating_point() else t for t in cast]
    n = len(tensors)
    with torch.autocast(cast[0].device.type, enabled=False):
        return fn(*cast[:n], *rest, **dict(zip(named, cast[n:])))
