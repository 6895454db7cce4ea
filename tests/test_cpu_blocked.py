"""The CPU reference path's fast forms against the float64 oracle: both eager forms (the composition of
torch ops; the blocked forward whose backward writes grad_target over diff) and the registered op's, each
with several row blocks (the block size is shrunk so small batches cross block boundaries)."""

import pytest
import torch

import fusedvq
from fusedvq import ops as routing
from fusedvq.arguments import LossForm, prepare
from fusedvq.cpu import blocked as cpu
from fusedvq.kernels.plan import COMPUTE_DTYPE
from fusedvq.ops import loss as op
from oracle import TOLERANCE, oracle, random_case, rel_err

B, D, K = 37, 187, 171
BLOCK_ROWS = 5  # 37 rows = 7 full blocks and one of 2


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(cpu, "_BLOCK_ELEMENTS", BLOCK_ROWS * K)


def _case(dtype, selector, nan_to_num, seed):
    g = torch.Generator().manual_seed(seed)
    kept = K if selector == "mask" else K - 20
    columns, mean, std = random_case(B, D, kept, mask=selector == "mask", duplicates=selector == "duplicates",
                                     generator=g)
    x = torch.randn(B, D, generator=g) * std + mean
    if nan_to_num:  # non-finite values in kept and dropped columns, rows of several blocks
        kept_cols = columns.nonzero().squeeze(1) if columns.dtype == torch.bool else columns
        x[1, kept_cols[0]], x[12, kept_cols[3]], x[30, kept_cols[-1]] = float("nan"), float("inf"), -float("inf")
        x[20, :] = float("nan")
    r = torch.randn(B, kept, generator=g)
    return x.to(dtype), r.to(dtype), columns, mean, std


def _run(path, x, r, columns, mean, std, norm, nan_to_num, reduction, monkeypatch):
    """The loss of one path, with autograd attached to x and r."""
    if path == "registered-op":  # what torch.compile runs: cpu.masked_mse_forward / masked_mse_backward
        plan = prepare(columns, mean if norm == "stats" else None, std if norm == "stats" else None, num_features=D,
                       num_kept=r.shape[1], form=LossForm(reduction), dtype=COMPUTE_DTYPE[x.dtype],
                       options={"norm": norm})
        stats = [plan.shift, plan.scale] if norm == "stats" else []
        loss, _, _ = op.masked_mse_forward(x, r, list(plan.columns), stats, None, None, nan_to_num=nan_to_num,
                                           reduction=plan.reduction, use_triton=False, gap_at=0, gap_width=0)
        return loss
    if path == "blocked":
        monkeypatch.setattr(routing, "_COMPOSED_MAX_ELEMENTS", 0)
    stats = (mean, std) if norm == "stats" else (None, None)
    return fusedvq.masked_mse(x, r, columns, *stats, norm=norm, nan_to_num=nan_to_num, reduction=reduction,
                              backend="reference")


def _check(path, dtype, selector, norm, nan_to_num, reduction, monkeypatch, seed=0, want_target_grad=True):
    x, r, columns, mean, std = _case(dtype, selector, nan_to_num, seed)
    x.requires_grad_()
    r.requires_grad_(want_target_grad)
    loss = _run(path, x, r, columns, mean, std, norm, nan_to_num, reduction, monkeypatch)
    grad_out = (torch.rand(loss.shape, dtype=torch.float64) + 0.5) * 1.7  # ≠ 1
    loss.backward(grad_out.to(loss.dtype))
    ref_loss, ref_gx, ref_gr = oracle(x, r, columns, mean if norm == "stats" else None,
                                      std if norm == "stats" else None, grad_out, nan_to_num=nan_to_num,
                                      reduction=reduction)
    assert loss.dtype == dtype and x.grad.dtype == dtype and x.grad.shape == x.shape
    errors = {"loss": rel_err(loss, ref_loss), "grad_x": rel_err(x.grad, ref_gx)}
    if want_target_grad:
        assert r.grad.dtype == dtype
        errors["grad_r"] = rel_err(r.grad, ref_gr)
    else:
        assert r.grad is None
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), f"{path}: relative errors {errors}"


PATHS = ["composed", "blocked", "registered-op"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("selector", ["mask", "duplicates"])
def test_paths_match_oracle(small_blocks, monkeypatch, path, reduction, selector):
    _check(path, torch.float32, selector, "stats", False, reduction, monkeypatch)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_to_num_zero_gradient(small_blocks, monkeypatch, path, reduction):
    _check(path, torch.float32, "duplicates", "stats", True, reduction, monkeypatch, seed=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(small_blocks, monkeypatch, path, dtype):
    _check(path, dtype, "duplicates", "stats", True, "mean", monkeypatch, seed=2)


@pytest.mark.parametrize("path", PATHS)
def test_norm_none(small_blocks, monkeypatch, path):
    _check(path, torch.float32, "mask", "none", False, "sum", monkeypatch, seed=3)


@pytest.mark.parametrize("path", ["composed", "blocked"])
def test_target_without_grad(small_blocks, monkeypatch, path):
    _check(path, torch.float32, "mask", "stats", False, "mean", monkeypatch, seed=4, want_target_grad=False)


def test_backward_twice_through_one_graph(small_blocks, monkeypatch):
    """The first backward spends the forward's diff (grad_target is written over it); a second one, with
    retain_graph, must compute it again and still be exact."""
    monkeypatch.setattr(routing, "_COMPOSED_MAX_ELEMENTS", 0)
    x, r, columns, mean, std = _case(torch.float32, "duplicates", False, seed=8)
    x.requires_grad_()
    r.requires_grad_()
    loss = fusedvq.masked_mse(x, r, columns, mean, std, backend="reference")
    for grad_out, retain in ((1.3, True), (0.6, False)):
        x.grad = r.grad = None
        loss.backward(torch.tensor(grad_out), retain_graph=retain)
        _, ref_gx, ref_gr = oracle(x, r, columns, mean, std, torch.tensor(grad_out, dtype=torch.float64))
        assert rel_err(x.grad, ref_gx) <= TOLERANCE[torch.float32]
        assert rel_err(r.grad, ref_gr) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_columns_blocks(small_blocks, dtype):
    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, D, (K,), generator=g)
    index[-1] = index[0]
    grad_xk = torch.randn(B, K, generator=g)
    want = torch.zeros(B, D, dtype=torch.float64).index_add_(1, index, grad_xk.double())
    got = cpu.scatter_columns(grad_xk, index, D, dtype)
    assert got.dtype == dtype and rel_err(got, want) <= TOLERANCE[dtype]


def test_sum_of_squares_large_batch():
    """A single fp32 dot over B·K = 11M elements drifts past 1e-5; the loss's blocked sums must not."""
    g = torch.Generator().manual_seed(6)
    diff = torch.randn(65536, K, generator=g) * 3 + 1
    want = diff.double().square().sum()
    zeros = torch.zeros_like(diff)
    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / diff.numel())):
        got = fusedvq.masked_mse(diff, zeros, torch.arange(K), norm="none", reduction=reduction,
                                 backend="reference")
        assert rel_err(got, want * scale) <= TOLERANCE[torch.float32]