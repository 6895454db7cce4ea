"""Autograd beyond one backward, on every path (the composition at small and large B·K, the Triton kernels
through the interpreter) and norm: double backward (a Hessian-vector product), torch.func's grad under vmap
and gradgradcheck, against the plain composition of tests/oracle.py differentiated twice (the bugs: right at
small B, an autograd-internal error above B·K = 2^18, and a second derivative silently taken as 0 for
norm="batch")."""

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from helpers import needs_interpreter
from oracle import oracle_z, rel_err


HIGHER = [
    pytest.param("reference", 4, id="reference-small"),
    pytest.param("reference", 2000, id="reference-large"),  # B·K above the composed path's 2^18
    pytest.param("triton", 37, id="triton-interpreter", marks=needs_interpreter),
]


@pytest.mark.parametrize("backend, B", HIGHER)
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_double_backward_is_exact_on_every_path(backend, B, norm):
    """A Hessian-vector product through the loss (create_graph=True) equals the plain composition's."""
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
    want = hvp(lambda x: F.mse_loss(oracle_z(x, index, mean, std, norm), r.double()), x.double())
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
    plain = lambda x: F.mse_loss(oracle_z(x, index, mean, std, norm), r.double())  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss))(x)
    want = torch.func.vmap(torch.func.grad(plain))(x.double())
    assert rel_err(got, want) <= 1e-5


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
