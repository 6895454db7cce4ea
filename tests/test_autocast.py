"""Autocast: under torch.autocast every path and form computes as F.mse_loss does (on autocast's float32
list) — float32 compute with no low-precision intermediate, a float32 result, the mixed dtypes autocast
produces accepted, gradients back in each input's own dtype — against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from helpers import force_blocked, interpreting
from oracle import TOLERANCE, column_oracle, oracle_z, rel_err

D, K = 40, 29
LOW = [torch.bfloat16, torch.float16]
# (B, path): the small-batch route, the composition (norm "none" / "stats") or the one-block passes, the
# blocked CPU passes (forced), the Triton kernels through the interpreter.
PATHS = [(4, "small"), (600, "composed"), (37, "blocked"), pytest.param(21, "triton", marks=pytest.mark.skipif(
    not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]


def _case(B, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(D, generator=g)[:K]
    index[4] = index[9]  # a duplicate kept column
    mean, std = torch.randn(D, generator=g) * 3, torch.rand(D, generator=g) + 0.5
    x = torch.randn(B, D, generator=g) * std * 2 + mean + 5  # an offset: σ's sums are what bf16 would spoil
    r = torch.randn(B, K, generator=g)
    return index.to(device), mean.to(device), std.to(device), x.to(device), r.to(device), g


def _check(loss, x, r, index, mean, std, grad_out, *, norm, reduction):
    """The float64 oracle on the values the call received: loss and the float32 inputs' gradients to the float32
    tolerance (a low-precision intermediate shows as 1e-3 and more); a low-precision input's gradient is the
    oracle's rounded to its dtype (to a few ties)."""
    ref = column_oracle(x, r, index.cpu(), mean.cpu() if norm == "stats" else None,
                        std.cpu() if norm == "stats" else None, grad_out.cpu(), norm=norm, reduction=reduction)
    assert loss.dtype == torch.float32, loss.dtype
    assert rel_err(loss, ref[0]) <= TOLERANCE[torch.float32], rel_err(loss, ref[0])
    for got, want, t in ((x.grad, ref[1], x), (r.grad, ref[2], r)):
        assert got.dtype == t.dtype
        tol = TOLERANCE[torch.float32] if t.dtype == torch.float32 else 2e-3
        assert rel_err(got, want.to(t.dtype)) <= tol, (t.dtype, rel_err(got, want.to(t.dtype)))


@pytest.mark.parametrize("B,path", PATHS)
@pytest.mark.parametrize("norm", ["batch", "stats", "none"])
@pytest.mark.parametrize("low", LOW)
def test_every_path_computes_in_float32(monkeypatch, B, path, norm, low):
    if path == "blocked":
        force_blocked(monkeypatch, 8, K)
    index, mean, std, x0, r0, g = _case(B, seed=B + len(norm))
    kw = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = fusedvq.MaskedMSELoss(index, **kw, num_features=D, norm=norm, reduction="column",
                                    backend="triton" if path == "triton" else "reference")
    # float32 features with a low-precision reconstruction (a decoder under autocast), then both low, the
    # backward once inside the autocast region.
    for xd, rd, inside in ((torch.float32, low, False), (low, low, True), (torch.float32, torch.float32, True)):
        x, r = x0.to(xd, copy=True).requires_grad_(), r0.to(rd, copy=True).requires_grad_()
        grad_out = torch.rand(K, generator=g) + 0.5
        with torch.autocast("cpu", dtype=low):
            loss = loss_fn(x, r)
            if inside:
                loss.backward(grad_out)
        if not inside:
            loss.backward(grad_out)
        _check(loss, x, r, index, mean, std, grad_out, norm=norm, reduction="column")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_functional_form_and_reductions(reduction):
    index, mean, std, x0, r0, g = _case(5, seed=3)
    x, r = x0.bfloat16().requires_grad_(), r0.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedvq.masked_mse(x, r, index, norm="batch", reduction=reduction)
        want = F.mse_loss(x.float()[:, index], r0, reduction=reduction)  # what PyTorch's loss returns under autocast
    assert loss.dtype == want.dtype == torch.float32
    grad_out = torch.rand(loss.shape, generator=g) + 0.5
    loss.backward(grad_out)
    _check(loss, x, r, index, mean, std, grad_out, norm="batch", reduction=reduction)


def test_outside_autocast_mixed_dtypes_stay_an_error():
    index, mean, std, x, r, _ = _case(4, seed=4)
    with pytest.raises(TypeError, match="features and target must share one dtype, got features torch.bfloat16"):
        fusedvq.masked_mse(x.bfloat16(), r, index, mean, std)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="must be floating point"):
        fusedvq.masked_mse(x, r.long(), index, mean, std)


def test_float64_keeps_float64_as_f_mse_loss_does():
    index, mean, std, x0, r0, g = _case(6, seed=5)
    x, r = x0.double().requires_grad_(), r0.double().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedvq.masked_mse(x, r, index, mean.double(), std.double(), reduction="sum")
        mixed = fusedvq.masked_mse(x, r0.bfloat16(), index, mean.double(), std.double())
    assert loss.dtype == mixed.dtype == torch.float64 == F.mse_loss(x[:, index], r0.bfloat16()).dtype
    grad_out = torch.tensor(1.3, dtype=torch.float64)
    loss.backward(grad_out)
    ref = column_oracle(x, r, index, mean.double(), std.double(), grad_out, norm="stats", reduction="sum")
    assert max(rel_err(a, b) for a, b in zip((loss, x.grad, r.grad), ref)) <= 1e-12


@pytest.mark.parametrize("norm", ["batch", "stats", "none"])
@pytest.mark.parametrize("B", [4, 700])  # the small-batch route; one block (norm "batch")
def test_cleaner_and_recon_loss(norm, B):
    index, mean, std, x0, r0, g = _case(B, seed=6)
    kw = dict(mean=mean, std=std) if norm == "stats" else {}
    cleaner = fusedvq.FeatureCleaner(index, **kw, num_features=D, norm=norm)
    x = x0.bfloat16().requires_grad_()
    recon = r0.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = cleaner(x)
        z_functional = fusedvq.clean_features(x, index, **kw, norm=norm)
        loss = cleaner.recon_loss(recon, z)  # a float32 z with a bf16 reconstruction
    assert z.dtype == z_functional.dtype == loss.dtype == torch.float32
    ref_z = oracle_z(x.detach().double(), index, kw.get("mean"), kw.get("std"), norm)
    assert rel_err(z, ref_z) <= TOLERANCE[torch.float32] and rel_err(z_functional, ref_z) <= TOLERANCE[torch.float32]
    assert rel_err(loss, F.mse_loss(ref_z, recon.double())) <= TOLERANCE[torch.float32]
    grad_z = torch.rand(B, K, generator=g, dtype=torch.float64)
    z.backward(grad_z.float())
    x64 = x.detach().double().requires_grad_()
    oracle_z(x64, index, kw.get("mean"), kw.get("std"), norm).backward(grad_z)
    assert x.grad.dtype == torch.bfloat16 and rel_err(x.grad, x64.grad.bfloat16()) <= 2e-3


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))])
def test_compiled_under_autocast(backend):
    torch._dynamo.reset()
    index, mean, std, x0, r0, g = _case(16, seed=7)
    loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm="batch", reduction="column", backend=backend)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x, r = x0.requires_grad_(), r0.bfloat16().requires_grad_()
    grad_out = torch.rand(K, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(x, r)
        loss.backward(grad_out)  # the compiled graph's backward inside the region
    _check(loss, x, r, index, mean, std, grad_out, norm="batch", reduction="column")


def test_torch_func_under_autocast():
    index, mean, std, x0, r0, _ = _case(6, seed=8)
    loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm="batch")
    r = r0.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_x = torch.func.grad_and_value(lambda x: loss_fn(x, r), has_aux=False)(x0)[::-1]
    ref = column_oracle(x0, r, index, None, None, torch.tensor(1.0), norm="batch", reduction="mean")
    assert loss.dtype == torch.float32 and rel_err(loss, ref[0]) <= 1e-5 and rel_err(grad_x, ref[1]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("norm", ["batch", "stats"])
@pytest.mark.parametrize("low", LOW)
def test_cuda_autocast(backend, norm, low):
    index, mean, std, x0, r0, g = _case(300, seed=9, device="cuda")
    kw = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = fusedvq.MaskedMSELoss(index, **kw, num_features=D, norm=norm, reduction="column", backend=backend)
    for xd, rd in ((torch.float32, low), (low, low)):
        x, r = x0.to(xd, copy=True).requires_grad_(), r0.to(rd, copy=True).requires_grad_()
        grad_out = (torch.rand(K, generator=g) + 0.5).cuda()
        with torch.autocast("cuda", dtype=low):
            loss = loss_fn(x, r)
        loss.backward(grad_out)
        _check(loss, x, r, index, mean, std, grad_out, norm=norm, reduction="column")
