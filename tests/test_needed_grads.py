"""Only the gradients autograd asks for are computed into memory: a target without grad (a frozen decoder's
output) gets no grad_target, features without grad no grad_x, on every path, with the wanted gradient
unchanged against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedvq.arguments import build_column_map
from fusedvq.loss import MaskedMSELoss
from helpers import force_blocked, interpreting

PATHS = ["composed", "blocked",
         pytest.param("triton", marks=pytest.mark.skipif(not interpreting, reason="needs TRITON_INTERPRET=1"))]
D, K = 30, 21


def rel_err(got, ref) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def _case(B, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(D, generator=g)[:K]
    index[4] = index[9]  # a duplicate
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.3
    x = mean + std * torch.randn(B, D, generator=g)
    return index, mean, std, x, torch.randn(B, K, generator=g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("wants", ["x", "target"])
def test_only_the_wanted_gradient(monkeypatch, path, norm, reduction, wants):
    if path == "blocked":
        force_blocked(monkeypatch, 8, K)
    index, mean, std, x, r = _case(33, seed=len(norm) + len(wants))
    stats = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = MaskedMSELoss(index, **stats, num_features=D, norm=norm, reduction=reduction,
                            backend="triton" if path == "triton" else "reference")
    x.requires_grad_(wants == "x")
    r.requires_grad_(wants == "target")
    got = loss_fn(x, r)
    w = torch.rand(got.shape) + 0.5
    (got * w).sum().backward()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    kept = x64[:, index]
    if norm == "stats":
        z = (kept - mean.double()[index]) / std.double()[index]
    else:
        z = (kept - kept.mean(0)) / kept.std(0)
    (F.mse_loss(z, r64, reduction=reduction) * w.double()).sum().backward()
    if wants == "x":
        assert r.grad is None and rel_err(x.grad, x64.grad) <= 1e-5
    else:
        assert x.grad is None and rel_err(r.grad, r64.grad) <= 1e-5


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(not interpreting,
                                                                                        reason="interpreter"))])
@pytest.mark.parametrize("batch", [False, True])
def test_the_backward_op_allocates_only_what_is_wanted(use_triton, batch):
    index, mean, std, x, r = _case(9, seed=3)
    cmap = build_column_map(index, D)
    ops = torch.ops.fusedvq
    options = dict(nan_to_num=False, reduction=1, use_triton=use_triton, gap_at=0, gap_width=0)
    if batch:
        _, stats, colsums = ops.batch_mse_forward(x, r, list(cmap), 1e-8, "", None, None, **options)
        def backward(nx, nr):
            return ops.batch_mse_backward(torch.tensor(1.0), x, r, list(cmap), [stats, colsums], "", None, None,
                                          **options, needs_x=nx, needs_target=nr, needs_embeddings=False)
    else:
        shift, scale = mean[index], std[index].reciprocal()
        _, diff, finite = ops.masked_mse_forward(x, r, list(cmap), [shift, scale], None, None, **options)
        def backward(nx, nr):
            return ops.masked_mse_backward(torch.tensor(1.0), x, r, list(cmap), [shift, scale], [diff, finite], None,
                                           None, **options, needs_x=nx, needs_target=nr, needs_embeddings=False)
    full_x, full_r, _ = backward(True, True)  # (and grad_embeddings: 0-element without embeddings)
    only_x, none_r, _ = backward(True, False)
    none_x, only_r, _ = backward(False, True)
    assert none_r.numel() == 0 and none_x.numel() == 0
    assert torch.equal(only_x, full_x) and torch.equal(only_r, full_r)


def test_compiled_step_with_a_frozen_target():
    index, mean, std, x, r = _case(16, seed=4)
    loss_fn = MaskedMSELoss(index, mean=mean, std=std, num_features=D)
    eager_x = x.clone().requires_grad_()
    loss_fn(eager_x, r).backward()
    compiled_x = x.clone().requires_grad_()
    torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(compiled_x, r).backward()
    assert torch.allclose(compiled_x.grad, eager_x.grad, rtol=1e-6, atol=1e-7)
