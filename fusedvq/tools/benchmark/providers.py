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


def eager_loss(mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, norm: str, mode: str = "") -> LossFn:
    """The fix users write first: normalize all D columns, keep the masked ones, F.mse_loss (clean+mse: the
    same normalized features are the target, F.mse_loss(recon, z))."""
    if norm == "stats":

        def clean(x):
            return ((x - mean) / std)[:, mask]

    else:  # the motivating project's batch normalization (and fusedvq's norm="batch", nan_to_num=True)

        def clean(x):
            x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
            std = x.std(0)
            z = (x - x.mean(0)) / torch.where(std < 1e-8, torch.ones_like(std), std)
            return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)[:, mask]

    if mode == "clean+mse":
        return lambda x, r: F.mse_loss(r, clean(x))
    if mode == "columns":
        return lambda x, r: F.mse_loss(clean(x), r, reduction="none").mean(0).mean()
    return lambda x, r: F.mse_loss(clean(x), r)


def _fusedvq_loss(case: Case, mask, stats, backend: str) -> LossFn:
    import fusedvq

    options = {"nan_to_num": True} if case.norm == "batch" else {}  # as the plain fix of norm="batch" does
    if case.mode == "clean+mse":
        cleaner = fusedvq.FeatureCleaner(mask, *stats, norm=case.norm, backend=backend, **options)
        return lambda x, r: F.mse_loss(r, cleaner(x))
    if case.mode == "columns":  # the [K] errors, back-propagated through their mean as a training loop does
        columns = fusedvq.MaskedMSELoss(mask, *stats, norm=case.norm, reduction="column", backend=backend, **options)
        return lambda x, r: columns(x, r).mean()
    return fusedvq.MaskedMSELoss(mask, *stats, norm=case.norm, backend=backend, **options)


_compiled: dict[tuple, LossFn] = {}  # (norm, mode, dtype, device, D, K, compiler) → the one compiled eager function
# The "compiled" baseline's torch.compile backend: inductor, what a user's torch.compile runs. (The default test
# suite's smoke run of the providers sets "aot_eager": the same tracing without inductor's C++ builds.)
COMPILER = "inductor"


def make_loss(provider: str, case: Case, device: str) -> LossFn:
    """The provider's loss function for this case on this device; raises Unavailable if it cannot run."""
    from fusedvq.ops import triton_importable

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
            return _fusedvq_loss(case, mask, stats, backend)
        except NotImplementedError as err:
            raise Unavailable(str(err)) from None
    # The straightforward fix holds its statistics in the features' dtype, as the rest of a bfloat16 model
    # does: float32 statistics would promote z to float32 against a bfloat16 target, which F.mse_loss's
    # CUDA backward rejects ("Found dtype BFloat16 but expected Float").
    mean, std = mean.to(getattr(torch, case.dtype)), std.to(getattr(torch, case.dtype))
    if provider == "eager":
        return eager_loss(mask, mean, std, case.norm, case.mode)
    if provider == "compiled":
        key = (case.norm, case.mode if case.mode in ("clean+mse", "columns") else "", case.dtype, device, case.D, case.K,
               COMPILER)
        if key not in _compiled:
            if not hasattr(torch, "compile"):
                raise Unavailable("torch.compile is not available in this torch")
            _compiled[key] = torch.compile(eager_loss(mask, mean, std, case.norm, case.mode), dynamic=True,
                                           backend=COMPILER)
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
