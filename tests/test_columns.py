"""Per-column errors (reduction="column"), per-column weights and per-category errors, against an
independent float64 oracle: normalize all D columns, select, e = w·(z − r)², reduce by plain torch ops."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedvq
from fusedvq.arguments import build_column_map
from helpers import BACKENDS, INTERPRETER_ROWS, interpreting
from oracle import column_oracle, random_case, rel_err

REDUCTIONS = ["column", "mean", "sum", "none"]


def _case(B, D=187, K=171, seed=0, duplicates=False, gap=(0, 0), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, mask=not duplicates, duplicates=duplicates, generator=g)
    x = (torch.randn(B, D, generator=g) * std + mean).to(dtype)
    r = torch.randn(B, K + gap[1], generator=g).to(dtype)
    weight = torch.rand(K, generator=g) * 2
    weight[3] = 0.0  # a zero weight: its column neither counts nor gets a gradient
    return x, r, columns, mean, std, weight


def _check(backend, device, x, r, columns, mean, std, *, norm, reduction, weight=None, nan_to_num=False,
           gap=(0, 0), tol=None):
    module = fusedvq.MaskedMSELoss(columns, mean if norm == "stats" else None, std if norm == "stats" else None,
                                   num_features=x.shape[1], norm=norm, reduction=reduction, weight=weight,
                                   nan_to_num=nan_to_num, backend=backend, target_gap=gap).to(device)
    xd, rd = x.to(device).requires_grad_(), r.to(device).requires_grad_()
    loss = module(xd, rd)
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(loss.dtype).to(device))
    # The module holds μ and 1/σ in float32: the oracle takes σ = 1/(its 1/σ), so float64 compares exactly.
    idx = columns.nonzero().squeeze(1) if columns.dtype == torch.bool else columns
    mean_d = std_d = None
    if norm == "stats":
        mean_d, std_d = torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(x.shape[1], dtype=torch.float64)
        mean_d[idx], std_d[idx] = module.shift.double().cpu(), module.scale.double().cpu().reciprocal()
    ref = column_oracle(x, r, idx, mean_d, std_d, grad_out, norm=norm, reduction=reduction,
                        weight=None if weight is None else weight.float(), nan_to_num=nan_to_num, gap=gap)
    assert loss.shape == ref[0].shape and loss.dtype == x.dtype
    tol = tol if tol is not None else 1e-12 if x.dtype == torch.float64 else 1e-5
    errs = [rel_err(a, b) for a, b in zip((loss, xd.grad, rd.grad), ref)]
    assert max(errs) <= tol, f"relative errors (loss, grad_x, grad_r) {errs} > {tol}"
    return loss


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["stats", "batch", "none"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_columns_and_weights_against_oracle(backend_device, norm, reduction, weighted):
    backend, device = backend_device
    x, r, columns, mean, std, weight = _case(37, seed=1)
    _check(backend, device, x, r, columns, mean, std, norm=norm, reduction=reduction,
           weight=weight if weighted else None)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["column", "mean", "none"])
def test_target_gap_duplicates_and_non_finite(backend_device, norm, reduction):
    backend, device = backend_device
    x, r, columns, mean, std, weight = _case(21, D=60, K=40, seed=2, duplicates=True, gap=(17, 5))
    x[3, columns[0]] = float("nan")
    x[5, columns[1]] = float("inf")
    x[7:, columns[2]] = 4.25  # nearly constant in the batch
    _check(backend, device, x, r, columns, mean, std, norm=norm, reduction=reduction, weight=weight,
           nan_to_num=True, gap=(17, 5))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["column", "mean", "none"])
def test_float32_edge_columns(backend_device, norm, reduction):
    # A column constant within the batch, one at an offset of 1e4 with σ = 0.01, one near the float32 range
    # (norm="batch" takes the batch's own σ: 1e18, whose squares still fit), and a zero weight.
    backend, device = backend_device
    g = torch.Generator().manual_seed(21)
    B, D, K = 33, 40, 30
    columns = torch.randperm(D, generator=g)[:K]
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    x = torch.randn(B, D, generator=g) * std + mean
    constant, offset, huge = columns[:3].tolist()
    x[:, constant] = 7.25
    mean[offset], std[offset] = 1e4, 0.01
    x[:, offset] = 1e4 + 0.01 * torch.randn(B, generator=g)
    big = 2e38 if norm == "stats" else 1e18
    mean[huge], std[huge] = 0.0, big / 20
    x[:, huge] = big * (torch.rand(B, generator=g) * 2 - 1)
    r = torch.randn(B, K, generator=g)
    weight = torch.rand(K, generator=g) + 0.5
    weight[3] = 0.0
    loss = _check(backend, device, x, r, columns, mean, std, norm=norm, reduction=reduction, weight=weight)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("B", [4, 1100, 3000])  # composed, one-block / blocked CPU passes
@pytest.mark.parametrize("norm", ["stats", "batch", "none"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_reference_paths_exact(B, norm, reduction):
    x, r, columns, mean, std, weight = _case(B, seed=3, dtype=torch.float64)
    _check("reference", "cpu", x, r, columns, mean, std, norm=norm, reduction=reduction, weight=weight)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("B", [4, 3000])
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_of_columns_is_the_mean_loss(backend, norm, B, weighted):
    if backend == "triton" and B > 100:
        B = INTERPRETER_ROWS  # (the interpreter's time)
    x, r, columns, mean, std, weight = _case(B, seed=4)
    kw = dict(mean=mean, std=std) if norm == "stats" else {}
    w = weight if weighted else None
    cols = fusedvq.MaskedMSELoss(columns, norm=norm, reduction="column", weight=w, backend=backend, **kw)(x, r)
    loss = fusedvq.MaskedMSELoss(columns, norm=norm, weight=w, backend=backend, **kw)(x, r)
    assert abs(cols.mean().item() - loss.item()) <= 1e-6 * loss.item()


def test_column_backward_is_the_mean_backward():
    # A training loop logs the columns and back-propagates their mean: the gradients are the mean loss's.
    x, r, columns, mean, std, _ = _case(64, seed=5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fusedvq.masked_mse(x1, r, columns, mean, std, reduction="column").mean().backward()
    fusedvq.masked_mse(x2, r, columns, mean, std).backward()
    assert rel_err(x1.grad, x2.grad) <= 1e-6


def test_unit_weight_is_unweighted_and_zero_weight_drops_a_column():
    x, r, columns, mean, std, _ = _case(16, seed=6)
    K = r.shape[1]
    plain = fusedvq.masked_mse(x, r, columns, mean, std, reduction="column")
    ones = fusedvq.masked_mse(x, r, columns, mean, std, reduction="column", weight=torch.ones(K))
    assert torch.equal(plain, ones)
    w = torch.ones(K)
    w[:10] = 0
    xg = x.clone().requires_grad_()
    rg = r.clone().requires_grad_()
    cols = fusedvq.masked_mse(xg, rg, columns, mean, std, reduction="column", weight=w)
    assert torch.all(cols[:10] == 0) and torch.all(cols[10:] > 0)
    cols.sum().backward()
    assert torch.all(rg.grad[:, :10] == 0) and torch.all(rg.grad[:, 10:].abs().sum(0) > 0)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(170), "one entry per kept column \\(K = 171\\), got shape \\(170,\\)"),
    (torch.ones(171, 1), "1-D with one entry per kept column"),
    (torch.full((171,), -0.5), "kept column 0 has weight -0.5 \\(171 of 171 bad\\)"),
    (torch.tensor([1.0] * 170 + [float("nan")]), "kept column 170 has weight nan"),
    (torch.tensor([1.0] * 5 + [float("inf")] + [1.0] * 165), "kept column 5 has weight inf \\(1 of 171"),
    (torch.tensor([1.0] * 170 + [1e39], dtype=torch.float64), "fit torch.float32.*kept column 170 has weight 1e\\+39"),
    ("balanced", "needs the VQ-VAE's categories"),
    ({"cluster_1": 2.0}, "needs the VQ-VAE's categories"),
    (torch.ones(171, dtype=torch.complex64), "real numbers"),
])
def test_bad_weights_are_refused_with_the_numbers(bad, message):
    x, r, columns, mean, std, _ = _case(4, seed=7)
    with pytest.raises((ValueError, TypeError), match=message):
        fusedvq.MaskedMSELoss(columns, mean, std, weight=bad)
    with pytest.raises((ValueError, TypeError), match=message):
        fusedvq.masked_mse(x, r, columns, mean, std, weight=bad)


def test_weight_requiring_grad_is_refused():
    _, _, columns, mean, std, _ = _case(4, seed=7)
    with pytest.raises(ValueError, match="weight requires grad"):
        fusedvq.MaskedMSELoss(columns, mean, std, weight=torch.ones(171, requires_grad=True))


# ------------------------------------------------------------------------ traced, registered, captured


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("reduction", [3, 0])  # (the scalar reductions: test_op.py's opcheck)
def test_opcheck_column_and_weights(use_triton, reduction):
    g = torch.Generator().manual_seed(13)
    columns, mean, std = random_case(7, 12, 9, mask=False, duplicates=True, generator=g)
    cols, weight = list(build_column_map(columns, 12)), torch.rand(9, generator=g)
    x = torch.randn(7, 12, generator=g, requires_grad=True)
    r = torch.randn(7, 9, generator=g, requires_grad=True)
    stats = [mean[columns], std[columns].reciprocal()]
    options = dict(nan_to_num=False, reduction=reduction, use_triton=use_triton, gap_at=0, gap_width=0)
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_forward.default, (x, r, cols, stats, weight, None), options)
    torch.library.opcheck(torch.ops.fusedvq.batch_mse_forward.default, (x, r, cols, 1e-8, "", weight, None), options)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_compile_fullgraph_columns(backend, norm):
    torch._dynamo.reset()
    x, r, columns, mean, std, weight = _case(16, seed=14)
    kw = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = fusedvq.MaskedMSELoss(columns, norm=norm, reduction="column", weight=weight, backend=backend, **kw)

    def step(x, r):
        cols = loss_fn(x, r)
        return cols.mean(), cols

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, got_cols = compiled(xc, r)
    want, want_cols = step(xe, r)
    got.backward()
    want.backward()
    assert rel_err(got_cols, want_cols) <= 1e-6 and rel_err(xc.grad, xe.grad) <= 1e-5


def test_the_columns_are_deterministic():
    x, r, columns, mean, std, weight = _case(3000, seed=15)
    a = fusedvq.masked_mse(x, r, columns, mean, std, reduction="column", weight=weight)
    b = fusedvq.masked_mse(x, r, columns, mean, std, reduction="column", weight=weight)
    assert torch.equal(a, b)


def test_module_weight_survives_half_and_moves_with_to():
    _, _, columns, mean, std, weight = _case(4, seed=16)
    m = fusedvq.MaskedMSELoss(columns, mean, std, weight=weight).half()
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight, weight.float())
    assert np.isclose(float(m.weight.sum()), float(weight.sum()))
