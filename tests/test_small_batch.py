"""norm="batch" at small B on the CPU (cpu/small.py: the one-block path with batch norm's VJP written out)
against the float64 oracle, beside the blocked passes it replaces there: the loss and clean_features, every
reduction, NaN/Inf with nan_to_num, a column constant within the batch, a large offset, duplicate indices,
float64 to 1e-12, grad_output ≠ 1, B = 2 (the smallest batch with an unbiased std)."""

import pytest
import torch

import fusedvq
from fusedvq.cpu import small as cpu_small
from oracle import TOLERANCE, batch_oracle, rel_err

D, K = 13, 9
PATHS = ["small", "blocked"]


def _case(B, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, D, (K,), generator=g)
    index[1] = index[0]  # a duplicate: its gradients add up
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x[:, index[2]] = 3.25  # constant within the batch: σ → 1, z = 0
    x[:, index[3]] = 100 + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)  # |μ| ≫ σ (within what the
    # float64 oracle, which takes no shift, resolves to 1e-12)
    if B > 2:
        x[1, index[4]] = float("nan")
        x[2 % B, index[5]] = float("inf")
    r = torch.randn(B, K, generator=g, dtype=torch.float64)
    return x.to(dtype), r.to(dtype), index


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B", [2, 4, 37])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_the_oracle(monkeypatch, path, B, reduction, dtype):
    if path == "blocked":
        monkeypatch.setattr(cpu_small, "SMALL_ELEMENTS", 0)
    x, r, index = _case(B, dtype, seed=B)
    x.requires_grad_()
    r.requires_grad_()
    loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm="batch", nan_to_num=True, reduction=reduction,
                                    backend="reference")
    loss = loss_fn(x, r)
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(dtype))
    want, want_gx, want_gr = batch_oracle(x, r, index, grad_out, nan_to_num=True, reduction=reduction)
    errors = [rel_err(loss, want), rel_err(x.grad, want_gx), rel_err(r.grad, want_gr)]
    assert max(errors) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clean_features_match_the_oracle(monkeypatch, path, dtype):
    if path == "blocked":
        monkeypatch.setattr(cpu_small, "SMALL_ELEMENTS", 0)
    x, r, index = _case(6, dtype, seed=3)
    x.requires_grad_()
    z = fusedvq.FeatureCleaner(index, num_features=D, norm="batch", nan_to_num=True, backend="reference")(x)
    loss = torch.nn.functional.mse_loss(z, r, reduction="none")  # the VQ-led step's loss, against r
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(dtype))
    want, want_gx, _ = batch_oracle(x, r, index, grad_out, nan_to_num=True, reduction="none")
    assert max(rel_err(loss, want), rel_err(x.grad, want_gx)) <= TOLERANCE[dtype]


def test_the_small_path_is_what_runs_at_small_batches(monkeypatch):
    calls = []
    real = cpu_small.batch_mse_forward
    monkeypatch.setattr(cpu_small, "batch_mse_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, r, index = _case(4, torch.float32, seed=5)
    fusedvq.masked_mse(x, r, index, norm="batch", backend="reference")
    assert calls == [1]
