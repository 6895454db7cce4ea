"""The checks of one combinatorial case's run (tests/test_combinations.py, tests/combinations_partials.py): its
grad mode and autocast as one context, its backward, and its results and gradients against the oracle's."""

from __future__ import annotations

import contextlib

import torch

from combinations import Case
from oracle import TOLERANCE


def modes(case: Case) -> contextlib.ExitStack:
    """The case's grad mode and autocast, as one context."""
    stack = contextlib.ExitStack()
    stack.enter_context({"grad": contextlib.nullcontext(), "no_grad": torch.no_grad(),
                         "inference": torch.inference_mode()}[case.grad_mode])
    if case.autocast:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


def backward(case: Case, out: torch.Tensor) -> torch.Tensor:
    """The case's grad_output (random, ≠ 1, float64), run backward from out where it requires grad."""
    grad_out = (torch.rand(out.shape, generator=torch.Generator().manual_seed(case.seed + 2),
                           dtype=torch.float64) + 0.5) * 1.7
    if out.requires_grad:
        out.backward(grad_out.to(out.dtype))
    return grad_out


def close(name: str, got, ref, tol: float, problems: list, floor: float = 0.0) -> None:
    """got against ref: NaN (and, past got's dtype's range, ±Inf) in the same places, ‖got − ref‖ / max(‖ref‖,
    floor) <= tol for the rest."""
    got64 = got.detach().double().cpu()
    got_odd, ref_odd = ~torch.isfinite(got64), ~torch.isfinite(ref.to(got.dtype).double())
    if got.shape != ref.shape or not torch.equal(got_odd, ref_odd):
        problems.append(f"{name}: shape {tuple(got.shape)} / NaN or Inf at {got_odd.nonzero().flatten().tolist()[:6]}"
                        f", expected {tuple(ref.shape)} / at {ref_odd.nonzero().flatten().tolist()[:6]}")
        return
    a, b = got64[~got_odd], ref.double()[~ref_odd]
    err = (a - b).norm().item() / max(b.norm().item(), floor, 1e-300)
    if not err <= tol:
        problems.append(f"{name}: relative error {err:.3g} > {tol:g}")


def check_grads(rows: list, wants_grad: bool, problems: list) -> None:
    """Each (name, gradient or None, the input's dtype, the oracle's gradient, wanted, floor): set exactly
    when the call wants gradients and the input wants one, in the input's dtype, close to the oracle's."""
    for name, got, dtype, ref, wanted, floor in rows:
        if not (wants_grad and wanted):
            if got is not None:
                problems.append(f"{name} was set although not wanted")
        elif got is None or got.dtype != dtype:
            problems.append(f"{name} is {None if got is None else got.dtype}, expected {dtype}")
        else:
            close(name, got, ref, TOLERANCE[dtype], problems, floor)
