"""Inputs that used to give a quietly wrong result: each now gives the right one or a clear error."""

import re
import threading

import pytest
import torch

import fusedvq
from helpers import interpreting, needs_interpreter
from oracle import oracle, rel_err


def raises(exc, *fragments):
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ------------------------------------------------------------------ eps, and a reduction that recovers


@pytest.mark.parametrize("eps", ["1e-8", float("nan"), float("inf"), -1e-8, None, True, torch.tensor(1e-8)])
def test_eps_validated_before_launch(eps):
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    with raises((TypeError, ValueError), "eps"):
        fusedvq.masked_mse(x, r, torch.arange(6), norm="batch", eps=eps)
    with raises((TypeError, ValueError), "eps"):
        fusedvq.MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="batch", eps=eps)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_nan_to_num_must_be_a_bool(value):
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    with raises(TypeError, "nan_to_num", "True or False"):
        fusedvq.masked_mse(x, r, torch.arange(6), norm="none", nan_to_num=value)


@needs_interpreter
def test_failed_launch_does_not_poison_later_losses():
    """A launch that fails part-way (here the moments kernel, handed an eps the last program cannot use)
    must not leave the shared ticket counter non-zero: every later mean/sum loss stays right."""
    from fusedvq.kernels import batch_stats

    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(300, 9, generator=g), torch.randn(300, 9, generator=g)
    index = torch.arange(9)
    with pytest.raises(Exception):
        batch_stats.column_moments(x, index, "1e-8", False, finalize=True)
    for norm in ("none", "batch"):
        loss = fusedvq.masked_mse(x, r, index, norm=norm, backend="triton")
        want = fusedvq.masked_mse(x, r, index, norm=norm, backend="reference")
        assert rel_err(loss, want) <= 1e-5, norm


@needs_interpreter
def test_threads_do_not_share_reduction_scratch():
    """Concurrent mean losses from several threads on CPU tensors (interpreter): each gets its own."""
    results, errors = {}, []
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(200, 7, generator=g) * (i + 1), torch.randn(200, 7, generator=g)) for i in range(4)]

    def work(i):
        try:
            x, r = cases[i]
            results[i] = [fusedvq.masked_mse(x, r, torch.arange(7), norm="none", backend="triton") for _ in range(3)]
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (x, r) in enumerate(cases):
        want = torch.nn.functional.mse_loss(x.double(), r.double())
        assert all(rel_err(v, want) <= 1e-5 for v in results[i]), i


# ------------------------------------------------------------------ indices checked under torch.compile


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("bad", [12, -1])
def test_compiled_out_of_range_index_fails(backend, bad):
    """Traced, an index outside [0, D) fails on the device instead of dropping the column (the bug: the
    Triton loss skipped it and left grad_target's column unwritten)."""
    torch._dynamo.reset()
    a, b = torch.randn(5, 12), torch.randn(5, 3)
    index = torch.tensor([0, 1, bad])
    f = torch.compile(lambda a, b: fusedvq.masked_mse(a, b, index, norm="none", backend=backend), fullgraph=True)
    with pytest.raises(RuntimeError, match="outside the feature columns"):
        f(a, b)


# ------------------------------------------------------------------ 0/1 integer masks


def test_uint8_mask_is_refused():
    x, r = torch.randn(4, 10), torch.randn(4, 10)
    with raises(TypeError, "uint8", "mask.bool()"):
        fusedvq.masked_mse(x, r, torch.ones(10, dtype=torch.uint8), norm="none")
    with raises(TypeError, "uint8", "mask.bool()"):
        fusedvq.MaskedMSELoss(torch.ones(10, dtype=torch.uint8), num_features=10, norm="none")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_zero_one_integer_mask_of_length_d_is_refused(dtype):
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=dtype)
    x, r = torch.randn(4, 10), torch.randn(4, 10)
    with raises(ValueError, "only 0s and 1s", "10 entries", "mask.bool()"):
        fusedvq.masked_mse(x, r, mask, norm="none")
    with raises(ValueError, "only 0s and 1s", "mask.bool()"):
        fusedvq.MaskedMSELoss(mask, num_features=10, norm="none")


def test_permutation_of_two_columns_is_still_an_index():
    x, r = torch.randn(4, 2), torch.randn(4, 2)
    loss = fusedvq.masked_mse(x, r, torch.tensor([1, 0]), norm="none")
    assert torch.allclose(loss, torch.nn.functional.mse_loss(x[:, [1, 0]], r))


# ------------------------------------------------------------------ statistics in the compute dtype


@pytest.mark.parametrize("mean, std, what", [
    (1e39, 1.0, "mean"), (0.0, 1e39, "std"), (0.0, 1e-46, "std"), (0.0, 1e-39, "1/std"),
])
def test_stats_that_overflow_float32_are_refused(mean, std, what):
    """float64 μ, σ that float32 cannot hold (μ = 1e39 → inf; σ = 1e-46 → 0; 1/σ = 1e39 → inf) gave a loss
    near 2 instead of inf; they are refused with the column and the value."""
    x, r = torch.randn(4, 3), torch.randn(4, 3)
    mu = torch.zeros(3, dtype=torch.float64)
    sigma = torch.ones(3, dtype=torch.float64)
    mu[1], sigma[1] = mean, std
    with raises(ValueError, what, "float32", "kept column 1"):
        fusedvq.masked_mse(x, r, torch.arange(3), mu, sigma, stats_space="masked")
    with raises(ValueError, what, "float32"):
        fusedvq.MaskedMSELoss(torch.arange(3), mu, sigma, num_features=3, stats_space="masked")


def test_float64_features_keep_float64_statistics():
    x, r = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mu, sigma = torch.full((3,), 1e39, dtype=torch.float64), torch.full((3,), 1e39, dtype=torch.float64)
    loss = fusedvq.masked_mse(x, r, torch.arange(3), mu, sigma, stats_space="masked")
    assert rel_err(loss, torch.nn.functional.mse_loss((x - mu) / sigma, r)) <= 1e-12


# ------------------------------------------------------------------ reference accuracy at large B·K


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


if interpreting:  # the Triton loss, same bar (its per-program tiles keep each running sum short)
    @pytest.mark.slow
    def test_triton_sum_accurate_at_large_batch():
        x = torch.full((4096, 256), 1000.1)
        want = torch.tensor(1000.1, dtype=torch.float32).double() ** 2
        loss = fusedvq.masked_mse(x, torch.zeros_like(x), torch.arange(256), norm="none", backend="triton")
        assert rel_err(loss, want) <= 1e-6


# ------------------------------------------------------------------ higher-order and torch.func


def _plain_loss(x, r, index, norm, mean, std):
    """The float64-able composition of plain ops (the oracle's, differentiable to any order)."""
    if norm == "batch":
        mu = x.mean(0)
        var = (x - mu).square().sum(0) / (x.shape[0] - 1)
        z = (x - mu) / var.sqrt()
    else:
        z = (x - mean) / std
    return torch.nn.functional.mse_loss(z[:, index], r)


HIGHER = [
    pytest.param("reference", 4, id="reference-small"),
    pytest.param("reference", 2000, id="reference-large"),  # B·K above the composed path's 2^18
    pytest.param("triton", 37, id="triton-interpreter", marks=needs_interpreter),
]


@pytest.mark.parametrize("backend, B", HIGHER)
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_double_backward_is_exact_on_every_path(backend, B, norm):
    """A Hessian-vector product through the loss (create_graph=True) equals the plain composition's, at
    every batch size and backend (the bug: right at small B, an autograd-internal error above B·K = 2^18,
    and a second derivative silently taken as 0 for norm="batch")."""
    g = torch.Generator().manual_seed(B)
    D, K = 187, 171
    x = torch.randn(B, D, generator=g) * 2 + 1
    r = torch.randn(B, K, generator=g)
    index = torch.randperm(D, generator=g)[:K]
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    v = torch.randn(B, D, generator=g)
    stats = (mean, std) if norm == "stats" else (None, None)

    def hvp(loss_fn, x):
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
        (hv,) = torch.autograd.grad((gx * v.to(gx.dtype)).sum(), x)
        return gx.detach(), hv

    got = hvp(lambda x: fusedvq.masked_mse(x, r, index, *stats, norm=norm, backend=backend), x)
    want = hvp(lambda x: _plain_loss(x, r.double(), index, norm, mean.double(), std.double()), x.double())
    assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-4, (
        rel_err(got[0], want[0]), rel_err(got[1], want[1]))


@pytest.mark.parametrize("backend, B", HIGHER)
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_torch_func_grad_and_vmap_on_every_path(backend, B, norm):
    g = torch.Generator().manual_seed(7)
    D, K = 30, 20
    x = torch.randn(3, B, D, generator=g)
    r = torch.randn(B, K, generator=g)
    index = torch.randperm(D, generator=g)[:K]
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    stats = (mean, std) if norm == "stats" else (None, None)
    loss = lambda x: fusedvq.masked_mse(x, r, index, *stats, norm=norm, backend=backend)  # noqa: E731
    plain = lambda x: _plain_loss(x, r.double(), index, norm, mean.double(), std.double())  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss))(x)
    want = torch.func.vmap(torch.func.grad(plain))(x.double())
    assert rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------ layouts and devices without kernels


def _layouts():
    x = torch.randn(4, 6)
    return {
        "coo": x.to_sparse(),
        "csr": x.to_sparse_csr(),
        "nested": torch.nested.nested_tensor([torch.randn(6), torch.randn(6)]),
        "meta": torch.empty(4, 6, device="meta"),
    }


@pytest.mark.parametrize("layout", ["coo", "csr", "nested", "meta"])
@pytest.mark.parametrize("role", ["features", "target", "index", "mean"])
def test_unsupported_layouts_and_meta_get_a_clear_error(layout, role):
    x, r, index = torch.randn(4, 6), torch.randn(4, 6), torch.arange(6)
    mean, std = torch.zeros(6), torch.ones(6)
    odd = _layouts()[layout]
    if role == "features":
        x = odd
    elif role == "target":
        r = odd
    elif role == "index":
        index = odd.to(torch.int64) if layout != "nested" else torch.nested.nested_tensor([torch.arange(3)] * 2)
    else:
        mean = odd[0] if layout in ("meta",) else odd
    words = {"coo": "sparse", "csr": "sparse", "nested": "nested", "meta": "meta device"}[layout]
    with pytest.raises((TypeError, ValueError), match=words):
        fusedvq.masked_mse(x, r, index, mean, std, stats_space="masked")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_gradgradcheck(backend, norm):
    """torch.autograd.gradgradcheck (the bug: norm="batch" reported a Jacobian mismatch, its second
    derivative silently taken as 0). The Triton backend takes float32, so it is checked at float32
    precision through its double backward against the reference's float64 one instead."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2 + 1
    r = torch.randn(5, 4, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 3, 3, 6])
    stats = (torch.randn(7, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64) + .5)
    stats = stats if norm == "stats" else (None, None)
    if backend == "reference":
        fn = lambda x, r: fusedvq.masked_mse(x, r, index, *stats, norm=norm, reduction="sum")  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), r.requires_grad_()))
        return
    f32 = [t.float() if t is not None else None for t in stats]
    got = torch.autograd.functional.hessian(
        lambda x: fusedvq.masked_mse(x, r.float(), index, *f32, norm=norm, backend="triton"), x.float())
    want = torch.autograd.functional.hessian(
        lambda x: fusedvq.masked_mse(x, r, index, *stats, norm=norm, backend="reference"), x)
    assert rel_err(got, want) <= 1e-4
