"""Float64 in, float64 throughout: every path that accepts float64 (the composition at small B, the blocked
CPU passes at large B) matches the float64 oracle to 1e-12, values and both gradients, grad_output ≠ 1.
A single float32 intermediate shows as about 1e-8 and fails here. (The Triton backend refuses float64.)"""

from __future__ import annotations

import pytest
import torch

import fusedvq
from oracle import TOLERANCE, batch_oracle, oracle, rel_err

TOL = TOLERANCE[torch.float64]
# B = 37 takes the composition, B = 300 and 1000 the blocked CPU path (norm="batch").
SIZES = [37, 300, 1000]


def _inputs(B: int, D: int, K: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=g)[:K]] = True
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3 + 7
    r = torch.randn(B, K, generator=g, dtype=torch.float64)
    return x, r, mask, g


def _loss(form: str, x, r, mask, **kwargs):
    if form == "functional":
        return fusedvq.masked_mse(x, r, mask, **kwargs)
    mean, std = kwargs.pop("mean", None), kwargs.pop("std", None)
    reduction = kwargs.pop("reduction")
    return fusedvq.MaskedMSELoss(mask, mean, std, reduction=reduction, **kwargs)(x, r)


def _check(got, want):
    errors = {name: rel_err(a, b) for name, a, b in zip(("value", "grad_x", "grad_r"), got, want)}
    assert all(a.dtype == torch.float64 for a in got if a is not None)
    assert all(e <= TOL for e in errors.values()), f"relative errors {errors} exceed {TOL}"


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("B", SIZES)
def test_batch_loss_float64(form, reduction, B):
    x, r, mask, g = _inputs(B, 187, 171, seed=B)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = _loss(form, xg, rg, mask, norm="batch", reduction=reduction, backend="reference")
    grad_out = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    loss.backward(grad_out)
    want = batch_oracle(x, r, mask, grad_out, reduction=reduction)
    _check((loss.detach(), xg.grad, rg.grad), want)


@pytest.mark.parametrize("form", ["functional", "module"])
@pytest.mark.parametrize("B", SIZES)
def test_batch_clean_float64(form, B):
    x, _, mask, g = _inputs(B, 187, 171, seed=B + 1)
    xg = x.clone().requires_grad_()
    if form == "functional":
        z = fusedvq.clean_features(xg, mask, norm="batch", backend="reference")
    else:
        z = fusedvq.FeatureCleaner(mask, norm="batch", backend="reference")(xg)
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    z.backward(dz)
    # The oracle's loss is Σ dz·z through r = 0 and reduction "none": its grad_x is z's VJP with dz.
    x64 = x.clone().requires_grad_()
    mean = x64.mean(0)
    std = x64.std(0)
    want = torch.nan_to_num((x64 - mean) / std)[:, mask]
    want.backward(dz)
    _check((z.detach(), xg.grad), (want.detach(), x64.grad))


@pytest.mark.parametrize("B, D, K", [(37, 187, 171), (2000, 187, 171)])  # the composition, then blocked
def test_stats_loss_and_clean_float64(B, D, K):
    x, r, mask, g = _inputs(B, D, K, seed=5)
    mean = torch.randn(D, generator=g, dtype=torch.float64) * 3
    std = torch.rand(D, generator=g, dtype=torch.float64) + 0.25
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = fusedvq.masked_mse(xg, rg, mask, mean, std, reduction="sum", backend="reference")
    grad_out = torch.tensor(1.7, dtype=torch.float64)
    loss.backward(grad_out)
    _check((loss.detach(), xg.grad, rg.grad), oracle(x, r, mask, mean, std, grad_out, reduction="sum"))

    xg = x.clone().requires_grad_()
    z = fusedvq.clean_features(xg, mask, mean, std, backend="reference")
    dz = torch.randn(z.shape, generator=g, dtype=torch.float64)
    z.backward(dz)
    x64 = x.clone().requires_grad_()
    want = ((x64 - mean) / std)[:, mask]
    want.backward(dz)
    _check((z.detach(), xg.grad), (want.detach(), x64.grad))


@pytest.mark.parametrize("count", [300, torch.tensor(300.0, dtype=torch.float64)])  # this batch, merged ranks
def test_finalized_batch_statistics_stay_float64(count):
    """The weights of the batch-statistics backward, w = 1/(N − 1) and 1/N, are float64 for float64 moments."""
    from fusedvq.cpu.batch import MOMENT_INV_N, MOMENT_INV_N1, finalize_moments

    m2 = torch.rand(5, dtype=torch.float64) + 1
    stats = finalize_moments(count, torch.zeros_like(m2), torch.zeros_like(m2), m2, 1e-8)
    assert stats.dtype == torch.float64
    assert (stats[MOMENT_INV_N1] == 1 / 299).all() and (stats[MOMENT_INV_N] == 1 / 300).all()
