"""The loss against a hybrid decoder's output: target [B, K + c] whose c columns from `at` on are skipped
(target_gap), on every path (the composition, the blocked CPU path, the Triton kernels), every norm and
reduction, against a float64 oracle that gathers the target's loss columns with plain torch ops."""

from __future__ import annotations

import pytest
import torch

from fusedvq.arguments import build_column_map
from fusedvq.loss import MaskedMSELoss
from helpers import force_blocked, interpreting
from oracle import column_oracle, rel_err

PATHS = [
    "composed",
    "blocked",
    pytest.param("triton", marks=pytest.mark.skipif(not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")),
]
D, K, C = 40, 29, 6


def _case(B, at, seed, nan=False, strided=False):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(D, generator=g)[:K].sort().values
    index[3] = index[5]  # a duplicate kept column
    mean = torch.randn(D, generator=g, dtype=torch.float64) * 20
    std = torch.rand(D, generator=g, dtype=torch.float64) * 3 + 0.2
    x = (mean + std * torch.randn(B, D, generator=g, dtype=torch.float64)).float()
    if nan:
        x[0, index[2]] = float("nan")
        x[-1, index[7]] = float("inf")
    wide = torch.randn(B, K + C + 3, generator=g)
    r = wide[:, 1 : K + C + 1] if strided else wide[:, : K + C].clone()  # a row stride ≠ K + C
    return index, mean, std, x, r, g


def _oracle(x, r, index, mean, std, at, norm, reduction, nan_to_num, w):
    """oracle.column_oracle of this file's gap (at, C), with grad_out w."""
    stats = (mean, std) if norm == "stats" else (None, None)
    return column_oracle(x, r, index, *stats, w, norm=norm, reduction=reduction, nan_to_num=nan_to_num, gap=(at, C))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm", ["stats", "batch", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("at", [0, 11, K])
def test_gap_matches_the_oracle(monkeypatch, path, norm, reduction, at):
    B = 37
    if path == "blocked":
        force_blocked(monkeypatch, 8, K)
    index, mean, std, x, r, g = _case(B, at, seed=at + 3, nan=True, strided=at == 11)
    stats = dict(mean=mean.float(), std=std.float()) if norm == "stats" else {}
    loss_fn = MaskedMSELoss(index, **stats, num_features=D, norm=norm, reduction=reduction, nan_to_num=True,
                            backend="triton" if path == "triton" else "reference", target_gap=(at, C))
    x, r = x.requires_grad_(), r.requires_grad_()
    ref, gx, gr = _oracle(x, r, index, mean, std, at, norm, reduction, True,
                          w := torch.rand((B, K) if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5)
    got = loss_fn(x, r)
    (got * w.float()).sum().backward()
    assert got.shape == ref.shape
    assert rel_err(got.detach(), ref) <= 1e-5
    assert rel_err(x.grad, gx) <= 1e-5 and rel_err(r.grad, gr) <= 1e-5
    assert r.grad.shape == (B, K + C) and float(r.grad[:, at : at + C].abs().max()) == 0.0


def _check_columns_with_gap(path, norm, reduction, weighted, seed, compiled=False):
    """Per-column errors or a weighted mean / sum against a gapped target, values and both gradients
    (grad_output ≠ 1) against the float64 oracle."""
    index, mean, std, x, r, g = _case(23, 11, seed=seed, nan=True, strided=True)
    weight = torch.rand(K, generator=g) + 0.25 if weighted else None
    stats = dict(mean=mean.float(), std=std.float()) if norm == "stats" else {}
    loss_fn = MaskedMSELoss(index, **stats, num_features=D, norm=norm, reduction=reduction, weight=weight,
                            nan_to_num=True, backend="triton" if path == "triton" else "reference",
                            target_gap=(11, C))
    x, r = x.requires_grad_(), r.requires_grad_()
    got = (torch.compile(loss_fn, fullgraph=True, backend="aot_eager") if compiled else loss_fn)(x, r)
    grad_out = torch.rand(got.shape, generator=g, dtype=torch.float64) + 0.5
    got.backward(grad_out.float())
    ref = column_oracle(x, r, index, mean if norm == "stats" else None, std if norm == "stats" else None, grad_out,
                        norm=norm, reduction=reduction, weight=weight, nan_to_num=True, gap=(11, C))
    assert got.shape == ref[0].shape and got.dtype == torch.float32
    errs = [rel_err(a, b) for a, b in zip((got.detach(), x.grad, r.grad), ref)]
    assert max(errs) <= 1e-5, f"relative errors (loss, grad_x, grad_r) {errs}"
    assert float(r.grad[:, 11 : 11 + C].abs().max()) == 0.0


COLUMNS_AND_WEIGHTS = [("column", False), ("column", True), ("mean", True), ("sum", True)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("norm", ["stats", "batch", "none"])
@pytest.mark.parametrize("reduction,weighted", COLUMNS_AND_WEIGHTS)
def test_gap_with_columns_and_weights(monkeypatch, path, norm, reduction, weighted):
    if path == "blocked":
        force_blocked(monkeypatch, 8, K)
    _check_columns_with_gap(path, norm, reduction, weighted, seed=len(norm) + 7 * weighted)


@pytest.mark.parametrize("path", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("norm,reduction,weighted", [("stats", "column", True), ("none", "mean", True),
                                                     ("batch", "column", False)])
def test_gap_with_columns_and_weights_compiled(path, norm, reduction, weighted):
    torch._dynamo.reset()
    _check_columns_with_gap(path, norm, reduction, weighted, seed=5, compiled=True)


def test_gap_width_errors_name_the_numbers():
    index = torch.arange(K)
    loss_fn = MaskedMSELoss(index, num_features=D, norm="none", target_gap=(4, C))
    with pytest.raises(ValueError, match=f"must have {K + C}: the {K} kept columns and the {C} columns"):
        loss_fn(torch.randn(3, D), torch.randn(3, K))
    for bad in [(K + 1, 2), (-1, 2), (3, -1), (1.5, 2), (True, 1), (1, 2, 3)]:
        with pytest.raises(ValueError, match="target_gap"):
            MaskedMSELoss(index, num_features=D, norm="none", target_gap=bad)


def test_gap_double_backward_and_compile():
    index, mean, std, x, r, _ = _case(6, 9, seed=1)
    loss_fn = MaskedMSELoss(index, mean=mean.float(), std=std.float(), num_features=D, target_gap=(9, C))
    x64 = x.double().requires_grad_()
    r64 = r.double().requires_grad_()
    gx, = torch.autograd.grad(loss_fn(x64, r64), x64, create_graph=True)
    gx.square().sum().backward()  # through the composition: second derivatives on both inputs
    assert r64.grad is not None and float(r64.grad[:, 9 : 9 + C].abs().max()) == 0.0
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    xe, re = x.clone().requires_grad_(), r.clone().requires_grad_()
    xc, rc = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss_fn(xe, re).backward()
    compiled(xc, rc).backward()
    assert rel_err(xc.grad, xe.grad) <= 1e-6 and rel_err(rc.grad, re.grad) <= 1e-6


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(not interpreting,
                                                                                        reason="interpreter"))])
@pytest.mark.parametrize("batch", [False, True])
def test_opcheck_with_a_gap(use_triton, batch):
    index, mean, std, x, r, _ = _case(7, 12, seed=2)
    cmap = build_column_map(index, D)
    x, r = x.requires_grad_(), r.requires_grad_()
    options = dict(nan_to_num=False, reduction=1, use_triton=use_triton, gap_at=12, gap_width=C)
    if batch:
        args = (x, r, list(cmap), 1e-8, "", None, None)
        torch.library.opcheck(torch.ops.fusedvq.batch_mse_forward.default, args, options)
    else:
        shift, scale = mean[index].float(), std[index].float().reciprocal()
        args = (x, r, list(cmap), [shift, scale], None, None)
        torch.library.opcheck(torch.ops.fusedvq.masked_mse_forward.default, args, options)


@pytest.mark.parametrize("path", PATHS)
def test_gap_with_float32_edge_columns(monkeypatch, path):
    # A column constant within the batch (σ → 1, z = 0 exactly), one at 1e4 ± 0.01,
    # one of 1e17 (its M2 near the float32 range).
    if path == "blocked":
        force_blocked(monkeypatch, 8, K)
    index, _, _, x, r, g = _case(40, 11, seed=9)
    x[:, index[0]] = 3.25
    x[:, index[1]] = 1e4 + 0.01 * torch.randn(40, generator=g)
    x[:, index[2]] = 1e17 * torch.rand(40, generator=g)  # M2 ~ 1e35: under float32 overflow (README)
    loss_fn = MaskedMSELoss(index, num_features=D, norm="batch", target_gap=(11, C),
                            backend="triton" if path == "triton" else "reference")
    x, r = x.requires_grad_(), r.requires_grad_()
    w = torch.tensor(1.0, dtype=torch.float64)
    ref, gx, gr = _oracle(x, r, index, None, None, 11, "batch", "mean", False, w)
    loss_fn(x, r).backward()
    assert rel_err(x.grad, gx) <= 1e-4 and rel_err(r.grad, gr) <= 1e-5
    for col in index[:3]:  # each edge column on its own (the constant one: dz − mean(dz), nothing through σ' = 1)
        assert rel_err(x.grad[:, col], gx[:, col]) <= 1e-4
