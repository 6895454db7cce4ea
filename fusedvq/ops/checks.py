"""What is wrong with a call's tensors, said with the numbers. The routing point (ops/__init__.py) checks a
call in one expression per check (free: shapes, dtypes, devices, no values read) and comes here only when
one fails, or for the rare case it leaves out (an empty batch, autocast's two dtypes), so a call with
right tensors runs nothing of this file. Each function raises the first error that applies (or returns when
there is none), backend_error returns it."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from ..strict import check_dense
from .autocast import active as autocast_active

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = TRITON_DTYPES + (torch.float64,)
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # looked up once, without importing it


def triton_importable() -> bool:
    return TRITON_INSTALLED


def pair(features: Tensor, target: Optional[Tensor], allow_empty: bool) -> None:
    """ops.check_pair's checks one by one: types, layouts, ranks, dtypes, devices and batch sizes."""
    for name, t in (("features", features), ("target", target)):
        if t is None and name == "target":  # (a cleaner's call)
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_nested:
            check_dense(t, name, meta=False)  # (meta after the device check: a device mismatch is said first)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, columns], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point (float32, float16, bfloat16 or float64), got {t.dtype}")
    if target is not None:
        if features.dtype != target.dtype and not autocast_active(features):  # (autocast casts, as for F.mse_loss)
            raise TypeError(f"features and target must share one dtype, got features {features.dtype} and target "
                            f"{target.dtype}")
        if features.device != target.device:
            meta = " (the meta device holds shapes without values: fusedvq needs real data)" if "meta" in (
                features.device.type, target.device.type) else ""
            raise ValueError(f"features are on {features.device} but target is on {target.device}: put both on one "
                             f"device{meta}")
        if target.shape[0] != features.shape[0]:
            raise ValueError(f"features have {features.shape[0]} rows but target has {target.shape[0]}: the batch "
                             f"sizes must match")
    if features.device.type == "meta":
        check_dense(features, "features")
    if features.shape[0] == 0 and not allow_empty:
        raise ValueError("the batch is empty (0 rows): " + ("there is nothing to clean" if target is None else
                                                            "the loss of no rows is undefined"))


def swapped(first: Tensor, second: Tensor, order: str) -> None:
    """A pair given the other way round (ops.check_order found it): `order` is the right one."""
    raise ValueError(f"the arguments look swapped: got [B, {first.shape[1]}] then [B, {second.shape[1]}], but the "
                     f"order is {order}")


def decoder_output(target: Tensor, num_kept: int, hybrid) -> None:
    """A MaskedMSELoss built from a hybrid VQ-VAE without target_gap compares a [B, K] target: a target of
    another width (the decoder's whole [B, K + c] output) is refused naming the decoder's width and the fix."""
    K, p, c = num_kept, hybrid.gap_at, hybrid.gap_width  # (as the message writes them)
    whole = " (that is its whole output)" if target.shape[1] == K + c else ""
    raise ValueError(
        f"target has {target.shape[1]} columns but this MaskedMSELoss compares the {K} kept feature columns "
        f"(target [B, {K}]); the hybrid VQ-VAE's decoder outputs {K + c} columns{whole}, its {c} embedding "
        f"columns at {p}..{p + c - 1}: pass target_gap=({p}, {c}) to compare the decoder's output in place, or "
        f"use VQReconLoss.from_checkpoint, which does")


def widths(features: Tensor, target: Optional[Tensor], plan) -> None:
    """x's D columns and r's K kept columns (plus the gap's skipped ones) that the plan was built for."""
    D, K, skipped, selector = plan.columns.inv_ptr.shape[0] - 1, plan.columns.index.shape[0], plan.gap.width, plan.selector
    if features.shape[1] != D:
        raise ValueError(f"features have {features.shape[1]} columns but the {selector} was built for {D} feature "
                         f"columns (it keeps {K} of {D})")
    if target is not None and target.shape[1] != K + skipped:
        raise ValueError(
            f"target has {target.shape[1]} columns but must have {K + skipped}: the {K} kept columns and the "
            f"{skipped} columns the loss skips (target_gap)" if skipped else
            f"target has {target.shape[1]} columns but the {selector} keeps {K} of the {D} feature columns — pass "
            f"the decoder's {K}-column reconstruction")


def device(features: Tensor, plan) -> None:
    """The module's buffers on the features' device."""
    if plan.columns.index.device != features.device:
        raise ValueError(f"features are on {features.device} but the module's buffers are on "
                         f"{plan.columns.index.device}: call .to({str(features.device)!r}) on the module")


def batch_rows(features: Tensor) -> None:
    """norm="batch" with this batch's own statistics: two rows at least."""
    if features.shape[0] < 2:
        raise ValueError(
            f'norm="batch" needs at least 2 rows for the unbiased std, got a batch of {features.shape[0]}: use '
            f'frozen statistics (norm="stats"), a larger batch, or sync_stats=True to pool rows across ranks')


def backend_error(name: str, features: Tensor) -> Exception:
    """Why backend `name` ("reference" or "triton") cannot run these features."""
    if name == "reference":
        return TypeError(f"features dtype {features.dtype} is not supported")
    if features.dtype not in TRITON_DTYPES:
        return TypeError(f'backend="triton" supports float32, float16 and bfloat16, got {features.dtype} '
                         f'(use backend="reference" for float64)')
    if not TRITON_INSTALLED:
        return RuntimeError('backend="triton" needs triton, which is not installed: pip install triton (CUDA '
                            'builds of torch bring it)')
    if not features.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return RuntimeError(f'backend="triton" needs CUDA tensors (features are on {features.device}); to run the '
                            f'kernels on the CPU, set TRITON_INTERPRET=1 before triton is imported')
    return ValueError(f"unknown backend {name!r}")
