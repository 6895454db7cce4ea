"""P partials against one target on the CPU at a small batch (all P partials within one row block of
cpu/partials.py), for PartialsMSELoss (built once per held plan) and partials_mse (per call): the whole step,
the target's normalization included, as a few differentiable aten ops whose autograd is C++

    z = (x[:, index] − shift)·scale      cpu_small.kept_plain (norm "none": x[:, index]; "batch": cpu/small.py's
                                         clean, nan_to_num included)
    loss = mse_loss(partials, z broadcast over the P partials)       "mean"
           mse_loss(..., "none").sum(rows) / B                       "column" ([P, K])
    with a hybrid's embeddings [B, c] (and a target_gap (at, c)), z is reference.combined(z, embeddings, at)
    [B, K + c] first (one cat of B·(K + c) elements, its backward slices: the objective over all K + c columns)

At B = 4 a step is per-call host work: the op's Python autograd node (about 50 µs forward and backward at
P = 24 here), a clean_features call beside it and the per-call checks cost more than the arithmetic, where
this route records four aten nodes (index_select, mul, expand, mse_loss; backward: aten's mse_loss_backward
for the partials and z, a sum over P, a multiply, the gather's index_add_). A list of P [B, K] partials is
stacked (one copy, whose backward hands each partial a slice of the one gradient). One expression checks a
call: anything it does not recognize (another dtype, device or shape, a traced or torch.func call,
autocast, an empty list, a gap without embeddings) returns None, and the full path, whose checks say what
is wrong, takes it. Double backward is autograd's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..kernels.plan import NORM_BATCH, REDUCTION_COLUMN, REDUCTION_NONE
from . import partials as cpu_partials
from . import small as cpu_small

_STRIDED = torch.strided
_MSE_LOSS = torch._C._nn.mse_loss
_FUNCTORCH_STACK = torch._C._functorch.peek_interpreter_stack
_COMPILING = torch.compiler.is_compiling
_AUTOCAST = torch.is_autocast_enabled


class PartialsRoute:
    """The small-batch route of one plan and mode (PartialsMSELoss's, rebuilt with its held plan).
    route(x, partials, embeddings=None) is the loss, or None for a call it does not take."""

    __slots__ = ("plan", "reduction", "batch", "width", "kept", "min_rows", "dtypes", "index", "shift", "scale",
                 "gap_at", "gap_width", "partial_width")

    def __init__(self, plan, mode):
        self.plan, self.reduction, self.batch = plan, mode.reduction, plan.norm == NORM_BATCH
        self.width, self.gap_at, self.gap_width = plan.columns.inv_ptr.shape[0] - 1, mode.gap_at, mode.gap_width
        self.kept = plan.columns.index.shape[0]
        self.partial_width = self.kept + mode.gap_width
        self.min_rows = 2 if self.batch else 1
        self.index, self.shift, self.scale = plan.columns.index, plan.shift, plan.scale
        # x in a compute dtype (no cast per call) that is the statistics' own
        self.dtypes = tuple(d for d in (torch.float32, torch.float64) if self.shift is None or self.shift.dtype is d)

    @staticmethod
    def of(plan, mode) -> Optional["PartialsRoute"]:
        """The route, or None where the plan or mode never takes it (nan_to_num with norm "none" / "stats",
        statistics off the CPU, the Triton backend, cross-rank statistics)."""
        if (plan.backend == "triton" or not plan.columns.index.is_cpu or plan.sync[0]
                or plan.sync[1] is not None or (plan.nan_to_num and plan.norm != NORM_BATCH)):
            return None
        return PartialsRoute(plan, mode)

    def __call__(self, x, partials, embeddings=None) -> Optional[Tensor]:
        # (traced first: a traced mask's K is a size known on the device only, which the size checks would guard on)
        if not (not _COMPILING() and type(x) is Tensor and x.is_cpu and x.layout is _STRIDED and not x.is_nested
                and x.dtype in self.dtypes and x.ndim == 2 and x.shape[1] == self.width and x.shape[0] >= self.min_rows
                and (not self.batch or x.shape[0] * self.kept <= cpu_small.SMALL_ELEMENTS)
                and _FUNCTORCH_STACK() is None and not _AUTOCAST("cpu")):
            return None
        B, dtype, e = x.shape[0], x.dtype, embeddings
        if (e is None) if self.gap_width else (e is not None):  # (a gap's columns are compared only with embeddings)
            return None
        if e is not None and not (type(e) is Tensor and e.is_cpu and e.layout is _STRIDED and not e.is_nested
                                  and e.dtype is dtype and e.ndim == 2 and e.shape == (B, self.gap_width)):
            return None
        if type(partials) is Tensor:
            if (partials.is_cpu and partials.layout is _STRIDED and not partials.is_nested and partials.dtype is dtype
                    and partials.ndim == 3 and partials.shape[0] and partials.shape[1] == B
                    and partials.shape[2] == self.partial_width and partials.numel() <= cpu_partials._BLOCK_ELEMENTS):
                return self.loss(x, partials, e)
        elif (type(partials) is list and partials
              and len(partials) * B * self.partial_width <= cpu_partials._BLOCK_ELEMENTS):
            # stack checks the members' types, shapes and devices (its error sends the call to the full path);
            # their dtypes (which it would promote) are checked first. (A third of the µs of checking each.)
            try:
                if {t.dtype for t in partials} != {dtype}:
                    return None
                stacked = torch.stack(partials)
            except (AttributeError, TypeError, RuntimeError):
                return None
            if (type(stacked) is Tensor and stacked.is_cpu and stacked.layout is _STRIDED and not stacked.is_nested
                    and stacked.shape[1] == B and stacked.shape[2] == self.partial_width):
                return self.loss(x, stacked, e)
        return None

    def clean(self, x: Tensor) -> Tensor:
        """z [B, K] in x's dtype, differentiable: cpu/small.py's node (norm "batch") or its kept_plain
        (two recorded ops)."""
        if self.batch:
            return cpu_small.clean(x, self.plan)
        return cpu_small.kept_plain(x, self.index, self.shift, self.scale)

    def loss(self, x: Tensor, partials: Tensor, embeddings: Optional[Tensor] = None) -> Tensor:
        """The loss of x (and the embeddings) against partials [P, B, K (+ c)], as differentiable aten ops."""
        z = self.clean(x)
        zx = (z if embeddings is None else reference.combined(z, embeddings, self.gap_at)).expand(partials.shape)
        if self.reduction == REDUCTION_COLUMN:
            return _MSE_LOSS(partials, zx, REDUCTION_NONE).sum(1).div_(x.shape[0])
        return _MSE_LOSS(partials, zx, self.reduction)
