"""norm="batch": batch statistics with gradients through μ and σ, against the float64 composition."""

import pytest
import torch

import fusedvq
from helpers import BACKENDS, INTERPRETER_ROWS, backend_cases, interpreted, interpreting
from oracle import TOLERANCE, batch_oracle, random_case, rel_err, strided


def run(backend, device, x, r, columns, *, reduction="mean", nan_to_num=False, eps=1e-8, module=False):
    """fusedvq's (loss, grad_x, grad_r) with grad_output ≠ 1, and the oracle's."""
    xd = x.to(device).requires_grad_()
    rd = r.to(device).requires_grad_()
    grad_shape = (x.shape[0], r.shape[1]) if reduction == "none" else ()
    grad_out = (torch.rand(grad_shape, dtype=torch.float64) + 0.5) * 1.3
    kwargs = dict(norm="batch", reduction=reduction, nan_to_num=nan_to_num, eps=eps, backend=backend)
    if module:
        num_features = None if columns.dtype == torch.bool else x.shape[1]
        loss = fusedvq.MaskedMSELoss(columns, num_features=num_features, **kwargs).to(device)(xd, rd)
    else:
        loss = fusedvq.masked_mse(xd, rd, columns, **kwargs)
    loss.backward(grad_out.to(loss.dtype).to(device))
    want = batch_oracle(x, r, columns, grad_out, eps=eps, nan_to_num=nan_to_num, reduction=reduction)
    return (loss, xd.grad, rd.grad), want


def assert_close(got, want, tol):
    errs = {name: rel_err(g, w) for name, g, w in zip(("loss", "grad_x", "grad_r"), got, want)}
    assert all(torch.isfinite(g).all() for g in got), "non-finite output"
    assert all(e <= tol for e in errs.values()), f"relative errors {errs} exceed {tol}"


def _inputs(B, D=187, K=171, seed=0, dtype=torch.float32, **case):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, generator=g, **case)
    x = (torch.randn(B, D, generator=g) * std + mean).to(dtype)
    return x, torch.randn(B, K, generator=g).to(dtype), columns


@pytest.mark.parametrize("backend_device,reduction,B", backend_cases(
    [(reduction, B) for reduction in ("mean", "none") for B in (3, 4, 37, INTERPRETER_ROWS, 1000, 4099)],
    # the interpreter's loops are covered at 65 rows (helpers.INTERPRETER_ROWS); more rows repeat them
    sweep=lambda backend_device, reduction, B: interpreted(backend_device) and B > INTERPRETER_ROWS,
    exists=lambda backend_device, reduction, B: not (interpreted(backend_device) and (B, reduction) == (4099, "none"))))
def test_parity_batch_sizes(backend_device, B, reduction):
    backend, device = backend_device
    x, r, columns = _inputs(B, seed=B)
    assert_close(*run(backend, device, x, r, columns, reduction=reduction), TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("selector", ["index", "duplicates"])
def test_options(backend_device, reduction, selector):
    backend, device = backend_device
    x, r, columns = _inputs(65, 270, 143, seed=1, mask=False, duplicates=selector == "duplicates")
    x, r = strided(x, "slice"), strided(r, "transposed")
    assert_close(*run(backend, device, x, r, columns, reduction=reduction), TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_inf_features(backend_device, reduction):
    backend, device = backend_device
    x, r, columns = _inputs(40, seed=2, mask=False, duplicates=True)
    kept = columns.tolist()
    x[0, kept[0]] = float("nan")
    x[1, kept[1]] = float("inf")
    x[2, kept[1]] = float("-inf")
    x[:, kept[3]] = float("nan")  # a whole kept column: μ = σ = 0 after nan_to_num
    got, want = run(backend, device, x, r, columns, reduction=reduction, nan_to_num=True)
    assert_close(got, want, TOLERANCE[torch.float32])
    assert (got[1].cpu()[~torch.isfinite(x)] == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_constant_column_has_finite_gradient(backend_device):
    backend, device = backend_device
    x, r, columns = _inputs(50, seed=3)
    kept = columns.nonzero().squeeze(1).tolist()
    x[:, kept[5]] = 3.25  # σ = 0 < eps: σ' = 1, gradient through μ only
    x[:, kept[6]] = x[:, kept[6]].mean() + 1e-12 * torch.randn(50)  # σ below eps, not exactly 0
    got, want = run(backend, device, x, r, columns, eps=1e-6)
    assert_close(got, want, TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_large_offset_columns_are_stable_in_float32(backend_device):
    # mean 1000, std 1 in float32: Σx² − (Σx)²/n would lose every digit; Welford/Chan must not.
    # (The interpreter takes 257 rows: the naive formula would lose the same digits, and 33 tiles are merged.)
    backend, device = backend_device
    g = torch.Generator().manual_seed(4)
    B, D, K = 257 if interpreted(backend_device) else 4096, 187, 171
    columns, _, _ = random_case(B, D, K, generator=g)
    x = torch.randn(B, D, generator=g) + 1000.0
    r = torch.randn(B, K, generator=g)
    assert_close(*run(backend, device, x, r, columns), 1e-3)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend_device, dtype):
    backend, device = backend_device
    x, r, columns = _inputs(INTERPRETER_ROWS if interpreted(backend_device) else 300, seed=5, dtype=dtype)
    assert_close(*run(backend, device, x, r, columns), TOLERANCE[dtype])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_module(backend_device):
    backend, device = backend_device
    x, r, columns = _inputs(77, seed=6, mask=False, duplicates=True)
    assert_close(*run(backend, device, x, r, columns, module=True), TOLERANCE[torch.float32])


def test_reference_float64_exact():
    x, r, columns = _inputs(29, 30, 20, seed=7, dtype=torch.float64)
    assert_close(*run("reference", "cpu", x, r, columns), 1e-12)


def test_batch_of_one_is_a_clear_error():
    x, r, columns = _inputs(1, seed=8)
    with pytest.raises(ValueError, match="at least 2 rows.*batch of 1"):
        fusedvq.masked_mse(x, r, columns, norm="batch")
    with pytest.raises(ValueError, match="at least 2 rows"):
        fusedvq.MaskedMSELoss(columns, norm="batch")(x, r)


def test_batch_takes_no_stats_and_sync_needs_a_process_group():
    x, r, columns = _inputs(8, seed=9)
    with pytest.raises(ValueError, match="mean was given but norm='batch'"):
        fusedvq.masked_mse(x, r, columns, torch.zeros(187), torch.ones(187), norm="batch")
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        fusedvq.masked_mse(x, r, columns, norm="batch", sync_stats=True)
    with pytest.raises(ValueError, match='norm="batch" only'):
        fusedvq.masked_mse(x, r, columns, torch.zeros(187), torch.ones(187), sync_stats=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_reference(reduction):
    g = torch.Generator().manual_seed(10)
    columns = torch.tensor([0, 2, 2, 5, 6])
    x = torch.randn(6, 7, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, r: fusedvq.masked_mse(x, r, columns, norm="batch", reduction=reduction, backend="reference"),
        (x, r),
    )


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck(use_triton, reduction):
    """Both registered ops of norm="batch", forward (with its autograd) and backward, for a [B, K] and a scalar
    loss ("sum" is "mean"'s shape)."""
    from fusedvq.arguments import build_column_map

    g = torch.Generator().manual_seed(11)
    cmap = build_column_map(torch.tensor([1, 3, 3, 0]), 5)
    x = torch.randn(9, 5, generator=g, requires_grad=True)
    r = torch.randn(9, 4, generator=g, requires_grad=True)
    args = (x, r, list(cmap), 1e-8, "", None, None)
    options = dict(nan_to_num=True, reduction=reduction, use_triton=use_triton, gap_at=0, gap_width=0)
    torch.library.opcheck(torch.ops.fusedvq.batch_mse_forward.default, args, options)
    loss, stats, colsums = torch.ops.fusedvq.batch_mse_forward(*args, **options)
    grad = torch.rand(loss.shape, generator=g) + 0.5
    bwd_args = (grad, x.detach(), r.detach(), list(cmap), [stats.detach(), colsums.detach()], "", None, None)
    needs = dict(needs_x=True, needs_target=True, needs_embeddings=False)
    torch.library.opcheck(torch.ops.fusedvq.batch_mse_backward.default, bwd_args, {**options, **needs})


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, r, columns = _inputs(64, seed=12)
    model = torch.nn.Linear(187, 187)
    loss_fn = fusedvq.MaskedMSELoss(columns, norm="batch")
    loss = torch.compile(lambda x, r: loss_fn(model(x), r), fullgraph=True, backend="aot_eager")(x, r)
    loss.backward()
    got = model.weight.grad.clone()
    model.zero_grad()
    eager = loss_fn(model(x), r)
    eager.backward()
    assert rel_err(loss, eager) <= 1e-6 and rel_err(got, model.weight.grad) <= 1e-5
