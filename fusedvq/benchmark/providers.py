"""The four ways the loss is timed: fused, reference, eager (the straightforward fix), compiled."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .cases import Case, Inputs, PROVIDERS, make_statistics


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
    from fusedvq.backend import triton_importable

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
