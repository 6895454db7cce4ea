"""Values and both gradients against the float64 composition of plain torch ops, on every backend."""

import pytest
import torch

import fusedvq
from helpers import BACKENDS, INTERPRETER_ROWS, backend_cases, check_parity, interpreted, interpreting
from oracle import batch_oracle, oracle, random_case, rel_err, strided

SHAPES = [(187, 171), (270, 143), (8, 8), (1024, 1000)]
BATCHES = [1, 3, 4, INTERPRETER_ROWS, 257, 4099]


def _inputs(B, D, K, dtype=torch.float32, seed=0, **case):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, generator=g, **case)
    x = (torch.randn(B, D, generator=g) * std + mean).to(dtype)
    r = torch.randn(B, K, generator=g).to(dtype)
    return x, r, columns, mean, std


def _interpreter_sweep(backend_device, B, D, K):
    # The interpreter's loops are covered at INTERPRETER_ROWS rows (helpers.py); larger batches repeat them.
    # The widest shape adds only its column blocks, which a few rows cover.
    return interpreted(backend_device) and (B > INTERPRETER_ROWS or (D, K) == (1024, 1000) and B >= INTERPRETER_ROWS)


@pytest.mark.parametrize("backend_device,B,D,K", backend_cases(
    [(B, D, K) for B in BATCHES for D, K in SHAPES], sweep=_interpreter_sweep,
    exists=lambda backend_device, B, D, K: not (interpreted(backend_device) and B * max(D, K) > 600_000)))
def test_shapes(backend_device, B, D, K):
    backend, device = backend_device
    x, r, columns, mean, std = _inputs(B, D, K, seed=B + D)
    check_parity(backend, device, x, r, columns, mean, std, stats="raw" if D != K else "masked")


@pytest.mark.sweep
@pytest.mark.skipif(not interpreting, reason="interpreter only")
def test_interpreter_large():
    # B = 4099 at the motivating widths, which test_shapes leaves to this test (the interpreter's time).
    x, r, columns, mean, std = _inputs(4099, 187, 171, seed=7)
    check_parity("triton", "cpu", x, r, columns, mean, std)


# μ, σ given per kept column reach the ops exactly as raw ones do, gathered (arguments.canonical_stats): the
# interpreter takes raw ones only.
@pytest.mark.parametrize("backend_device,stats,selector,reduction", backend_cases(
    [(stats, selector, reduction) for stats in ("raw", "masked") for selector in ("mask", "index", "duplicates")
     for reduction in ("mean", "sum", "none")],
    exists=lambda backend_device, stats, *_: stats == "raw" or not interpreted(backend_device)))
def test_options(backend_device, stats, selector, reduction):
    backend, device = backend_device
    case = {"mask": dict(mask=True), "index": dict(mask=False), "duplicates": dict(mask=False, duplicates=True)}
    x, r, columns, mean, std = _inputs(INTERPRETER_ROWS if interpreted(backend_device) else 257, 187, 171, seed=3,
                                       **case[selector])
    check_parity(backend, device, x, r, columns, mean, std, stats=stats, reduction=reduction)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_norm_none(backend_device, reduction):
    backend, device = backend_device
    x, r, columns, mean, std = _inputs(33, 270, 143, seed=4, mask=False, duplicates=True)
    check_parity(backend, device, x, r, columns, mean, std, norm="none", reduction=reduction)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("x_layout", ["slice", "transposed"])
@pytest.mark.parametrize("r_layout", ["transposed", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strides(backend_device, x_layout, r_layout, dtype):
    backend, device = backend_device
    x, r, columns, mean, std = _inputs(65, 187, 171, dtype, seed=5)
    x, r = strided(x, x_layout), strided(r, r_layout)
    assert not x.is_contiguous() and not r.is_contiguous()
    check_parity(backend, device, x, r, columns, mean, std)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes(backend_device, dtype, reduction):
    backend, device = backend_device
    x, r, columns, mean, std = _inputs(INTERPRETER_ROWS if interpreted(backend_device) else 300, 187, 171, dtype, seed=6)
    check_parity(backend, device, x, r, columns, mean, std, reduction=reduction)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_to_num(backend_device, reduction):
    backend, device = backend_device
    x, r, columns, mean, std = _inputs(50, 187, 171, seed=8, mask=False, duplicates=True)
    kept = columns.tolist()
    x[0, kept[0]] = float("nan")
    x[1, kept[1]] = float("inf")
    x[2, kept[2]] = float("-inf")
    x[3, :] = float("nan")  # a whole row, kept and dropped columns alike
    _, grad_x, _ = check_parity(backend, device, x, r, columns, mean, std, nan_to_num=True, reduction=reduction)
    bad = ~torch.isfinite(x)
    assert (grad_x.cpu()[bad] == 0).all()


def test_reference_float64_and_dropped_columns_get_zero_gradient():
    x, r, columns, mean, std = _inputs(20, 187, 171, torch.float64, seed=9)
    _, grad_x, _ = check_parity("reference", "cpu", x, r, columns, mean, std)
    assert (grad_x[:, ~columns] == 0).all()


@pytest.mark.parametrize("backend_device,B", backend_cases(
    [(4,), (70000,)], exists=lambda backend_device, B: B == 4 or not interpreted(backend_device)))
def test_large_offset_stats_keep_float32_accuracy(backend_device, B):
    # Features near 1000 with σ = 0.3: (x − μ)·(1/σ) is exact-ish in float32, x·(1/σ) − μ/σ cancels ~1e-4.
    # (The interpreter takes the small case.)
    backend, device = backend_device
    g = torch.Generator().manual_seed(12)
    columns, _, _ = random_case(B, 187, 171, generator=g)
    mean = 1000.0 + torch.randn(187, generator=g)
    std = torch.full((187,), 0.3)
    x = mean + 0.3 * torch.randn(B, 187, generator=g)
    r = torch.randn(B, 171, generator=g)
    check_parity(backend, device, x, r, columns, mean, std)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_non_contiguous_integer_index(backend_device, layout, norm):
    # The kernels read index[k] at offset k: a strided view or an expanded index must still mean its values.
    backend, device = backend_device
    g = torch.Generator().manual_seed(13)
    if layout == "strided":
        values = torch.randperm(187, generator=g)[:171]
        columns = torch.stack([values, torch.randint(0, 10**6, (171,), generator=g)], 1)[:, 0]
    else:
        columns = torch.tensor([3]).expand(12)  # one column, twelve times (the backward loops over the copies)
    assert not columns.is_contiguous()
    K = columns.shape[0]
    mean, std = torch.randn(187, generator=g), torch.rand(187, generator=g) + 0.5
    x, r = torch.randn(40, 187, generator=g), torch.randn(40, K, generator=g)
    if norm == "stats":
        check_parity(backend, device, x, r, columns, mean, std)
    else:
        xd, rd = x.to(device).requires_grad_(), r.to(device).requires_grad_()
        fusedvq.masked_mse(xd, rd, columns, norm="batch", backend=backend).backward(torch.tensor(1.5, device=device))
        want = batch_oracle(x, r, columns, torch.tensor(1.5))
        assert rel_err(xd.grad, want[1]) <= 1e-5 and rel_err(rd.grad, want[2]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4096, 256), (65536, 171)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_sum_accurate_at_large_batch(shape, reduction):
    """Σe over millions of terms stays within 1e-6 of float64 (the bug: 512K-term float32 dots drifted by
    up to 1.8e-4 for x = 1000.1, where F.mse_loss gets 2.4e-8)."""
    x = torch.full(shape, 1000.1)
    r = torch.zeros(shape)
    index = torch.arange(shape[1])
    want, _, _ = oracle(x, r, index, None, None, torch.tensor(1.0), reduction=reduction)
    for norm in ("none", "batch"):
        loss = fusedvq.masked_mse(x, r if norm == "none" else r + 0.5, index, norm=norm, reduction=reduction,
                                  backend="reference")
        ref = want if norm == "none" else torch.tensor(0.25 * (1 if reduction == "mean" else x.numel()))
        assert rel_err(loss, ref) <= 1e-6, norm


@pytest.mark.sweep
@pytest.mark.skipif(not interpreting, reason="interpreter only")
def test_triton_sum_accurate_at_large_batch():
    """The Triton loss, same bar (its per-program tiles keep each running sum short): through the
    interpreter a sweep, for its size."""
    x = torch.full((4096, 256), 1000.1)
    want = torch.tensor(1000.1, dtype=torch.float32).double() ** 2
    loss = fusedvq.masked_mse(x, torch.zeros_like(x), torch.arange(256), norm="none", backend="triton")
    assert rel_err(loss, want) <= 1e-6
