"""VQReconLoss against the straightforward fix, as an independent float64 oracle of plain torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ckpt_factory import make_plain_run, write_checkpoint

from fusedvq.checkpoint import CheckpointError
from fusedvq.recon import VQReconLoss

# Relative norm error bounds. The module holds μ and 1/σ in float32 (MaskedMSELoss's choice): float64 features
# are compared with the float64 oracle given the statistics as the module holds them.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def held(mean, std):
    """μ, σ as a module holds them: μ and 1/σ rounded to float32 (then widened for float64 features)."""
    return mean.float().double(), std.double().reciprocal().float().double().reciprocal()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def oracle(x, recon, mask, mean, std, *, norm="stats", reduction="mean", nan_to_num=False, grad_scale=None):
    """The plain fix in float64: normalize all D columns, keep the mask's, F.mse_loss; value and grads."""
    x64 = x.detach().double().requires_grad_()
    r64 = recon.detach().double().requires_grad_()
    xin = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0) if nan_to_num else x64
    z = (xin - mean.double()) / std.double() if norm == "stats" else xin
    loss = F.mse_loss(z[:, mask], r64, reduction=reduction)
    (loss * grad_scale).sum().backward()
    return loss.detach(), x64.grad, r64.grad


def inputs(B, parts, dtype, seed=0, noncontiguous=False):
    g = torch.Generator().manual_seed(seed)
    mean, std = (torch.from_numpy(a) for a in parts.raw_stats(seed))
    x = (mean + std * torch.randn(B, parts.D, generator=g, dtype=torch.float64)).to(dtype)
    if noncontiguous:  # a column slice of a wider buffer: row stride ≠ D
        x = torch.cat([x, torch.randn(B, 5, dtype=dtype, generator=g)], 1)[:, : parts.D]
    recon = torch.randn(B, parts.K, generator=g, dtype=torch.float64).to(dtype)
    return x.requires_grad_(), recon.requires_grad_(), mean, std


def check(loss_fn, x, recon, mask, mean, std, **oracle_kw):
    reduction = oracle_kw.get("reduction", "mean")
    g = torch.Generator().manual_seed(99)
    # grad_output ≠ 1 (and not constant for reduction="none").
    shape = (x.shape[0], int(mask.sum())) if reduction == "none" else ()
    grad_scale = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    if x.dtype == torch.float64 and mean is not None:
        mean, std = held(mean, std)
    ref, ref_gx, ref_gr = oracle(x, recon, mask, mean, std, grad_scale=grad_scale, **oracle_kw)
    got = loss_fn(x, recon)
    got.backward(grad_scale.to(got.dtype))
    tol = TOL[x.dtype]
    assert got.dtype == x.dtype and got.shape == ref.shape
    assert rel_err(got.detach(), ref) <= tol
    assert rel_err(x.grad, ref_gx) <= tol
    assert rel_err(recon.grad, ref_gr) <= tol
    assert float(x.grad[:, ~mask].abs().max()) == 0.0  # dropped columns get no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B", [1, 3, 257])
def test_explicit_mask_and_raw_stats(dtype, reduction, B):
    parts = make_plain_run(seed=B)
    x, recon, mean, std = inputs(B, parts, dtype, seed=B)
    mask = torch.from_numpy(parts.mask)
    backend = "reference" if dtype == torch.float64 else "auto"
    loss_fn = VQReconLoss(mask, mean, std, reduction=reduction, backend=backend)
    check(loss_fn, x, recon, mask, mean, std, reduction=reduction)


def test_masked_space_stats_and_noncontiguous_features():
    parts = make_plain_run(D=270, K=143, seed=5)
    x, recon, mean, std = inputs(64, parts, torch.float32, seed=5, noncontiguous=True)
    assert not x.is_contiguous()
    mask = torch.from_numpy(parts.mask)
    loss_fn = VQReconLoss(mask, torch.from_numpy(parts.mean_k), torch.from_numpy(parts.std_k))
    check(loss_fn, x, recon, mask, mean, std)


def test_norm_none_and_nan_to_num():
    parts = make_plain_run(seed=6)
    x, recon, _, _ = inputs(17, parts, torch.float32, seed=6)
    with torch.no_grad():
        x[0, 0], x[3, 5], x[4, 7] = float("nan"), float("inf"), float("-inf")
    mask = torch.from_numpy(parts.mask)
    loss_fn = VQReconLoss(mask, norm="none", nan_to_num=True)
    check(loss_fn, x, recon, mask, None, None, norm="none", nan_to_num=True)


@pytest.mark.parametrize("method", ["standard", "mad"])
def test_from_checkpoint_matches_the_plain_fix(tmp_path, method):
    parts = make_plain_run(method=method, seed=7)
    path = write_checkpoint(tmp_path, parts, stats_in_file=method == "standard", stats_beside=method == "mad")
    loss_fn = VQReconLoss.from_checkpoint(path, num_features=187)
    assert (loss_fn.num_features, loss_fn.num_kept) == (187, 171)
    assert loss_fn.spec.method == method
    assert {k: list(v) for k, v in loss_fn.categories.items()} == {k: v.tolist() for k, v in parts.groups.items()}
    x, recon, mean, std = inputs(129, parts, torch.float32, seed=7)
    check(loss_fn, x, recon, torch.from_numpy(parts.mask), mean, std)


def test_from_checkpoint_norm_none_needs_no_stats(tmp_path):
    parts = make_plain_run(seed=8)
    path = write_checkpoint(tmp_path, parts, stats_in_file=False)
    with pytest.raises(CheckpointError, match="no normalization statistics"):
        VQReconLoss.from_checkpoint(path)
    loss_fn = VQReconLoss.from_checkpoint(path, norm="none", reduction="sum")
    x, recon, _, _ = inputs(9, parts, torch.float32, seed=8)
    check(loss_fn, x, recon, torch.from_numpy(parts.mask), None, None, norm="none", reduction="sum")


def test_width_errors_name_the_numbers(tmp_path):
    parts = make_plain_run(seed=9)
    path = write_checkpoint(tmp_path, parts)
    with pytest.raises(CheckpointError) as info:
        VQReconLoss.from_checkpoint(path, num_features=270)
    assert "187 entries" in str(info.value) and "270 columns" in str(info.value)

    loss_fn = VQReconLoss.from_checkpoint(path)
    with pytest.raises(ValueError, match="features have 270 columns but the VQ-VAE's feature_mask covers 187"):
        loss_fn(torch.randn(4, 270), torch.randn(4, 171))
    with pytest.raises(ValueError, match="recon has 187 columns but the VQ-VAE's decoder reconstructs the 171"):
        loss_fn(torch.randn(4, 187), torch.randn(4, 187))


def test_bad_categories_are_rejected():
    mask = torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="index 10, outside the 10 kept columns"):
        VQReconLoss(mask, norm="none", categories={"a": [0, 10]})


def test_module_moves_and_reprs(tmp_path):
    loss_fn = VQReconLoss.from_checkpoint(write_checkpoint(tmp_path, make_plain_run(seed=10)))
    assert "features 187 → recon 171, 8 categories" in repr(loss_fn)
    double = loss_fn.to(torch.float64)  # buffers follow the module; float64 features work on the reference
    x = torch.randn(2, 187, dtype=torch.float64)
    assert double(x, torch.randn(2, 171, dtype=torch.float64)).dtype == torch.float64
