"""A hybrid's objective: one MSE over all K + c decoder columns, the K feature columns' z and the caller's c
embeddings at their decoder columns (F.mse_loss(recon, combine(z, embeddings)), read in place), on every
path (the composition, the CPU blocked passes, the Triton kernels through the interpreter), every norm and
reduction, with weights, against tests/oracle.py's hybrid_oracle; the VQ-led step through FeatureCleaner;
errors naming the numbers; torch.compile, opcheck and double backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from fusedvq import ops as routing
from fusedvq.arguments import build_column_map
from helpers import interpreting
from oracle import TOLERANCE, hybrid_oracle, rel_err
from ckpt_factory import make_run, write_checkpoint

D, K, AT, C = 40, 29, 11, 6
NORMS = ("stats", "none", "batch")
REDUCTIONS = ("mean", "sum", "none", "column")


def _case(B, seed, dtype=torch.float32):
    """(index with a duplicate, μ, σ exact in float32 (σ a power of 2), x, r [B, K + C] a strided view, e
    [B, C] column-major)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(D, generator=g)[:K]
    index[3] = index[5]
    mean = (torch.randn(D, generator=g) * 3).double()
    std = 2.0 ** torch.randint(-2, 3, (D,), generator=g).double()
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    r = torch.randn(B, K + C + 3, generator=g, dtype=dtype)[:, 1 : K + C + 1].requires_grad_()
    e = torch.randn(C, B, generator=g, dtype=dtype).t().requires_grad_()
    return index, mean, std, x, r, e, g


def _check(B, seed, norm, reduction, weighted, backend="reference", dtype=torch.float32):
    index, mean, std, x, r, e, g = _case(B, seed, dtype)
    w = torch.rand(K + C, generator=g) + 0.2 if weighted else None
    stats = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm=norm, reduction=reduction, target_gap=(AT, C),
                                    weight=w, backend=backend, **stats)
    out = loss_fn(x, r, embeddings=e)
    grad_out = torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5  # ≠ 1
    out.backward(grad_out.to(dtype))
    ref = hybrid_oracle(x, r, e, index, mean if stats else None, std if stats else None, grad_out, at=AT,
                        norm=norm, reduction=reduction, weight=w)
    assert out.shape == ref[0].shape and out.dtype == dtype
    for got, want in zip((out, x.grad, r.grad, e.grad), ref):
        assert rel_err(got, want) <= TOLERANCE[dtype], (norm, reduction, weighted)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("path", ["composed", "blocked"])
def test_objective_on_the_cpu_paths(monkeypatch, path, norm, reduction):
    if path == "blocked":  # B·K above the composition's and the small-batch route's limits
        monkeypatch.setattr(routing, "_COMPOSED_MAX_ELEMENTS", 64)
        monkeypatch.setattr(routing, "_GAP_COMPOSED_MAX_ELEMENTS", 64)
    for weighted, dtype in ((False, torch.float32), (True, torch.float64)):
        _check(9 if path == "composed" else 33, 1, norm, reduction, weighted, dtype=dtype)


@pytest.mark.skipif(not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("norm,reduction,weighted", [("stats", "mean", True), ("none", "sum", False),
                                                     ("stats", "column", True), ("batch", "none", True),
                                                     ("batch", "mean", False), ("batch", "column", False)])
def test_objective_in_the_kernels(norm, reduction, weighted):
    _check(9, 2, norm, reduction, weighted, backend="triton")


def test_only_the_embeddings_or_only_the_recon_want_a_gradient():
    index, mean, std, x, r, e, _ = _case(6, 3)
    loss_fn = fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C))
    frozen = e.detach()
    loss_fn(x, r, embeddings=frozen).backward()
    ref = hybrid_oracle(x, r, e, index, mean, std, torch.tensor(1.0), at=AT, norm="stats", reduction="mean")
    assert frozen.grad is None and rel_err(r.grad, ref[2]) <= 1e-5
    (ge,) = torch.autograd.grad(loss_fn(x.detach(), r.detach(), embeddings=e), (e,))
    assert rel_err(ge, ref[3]) <= 1e-5


def test_a_different_objective_from_the_feature_columns_alone():
    # (K·a + c·b)/(K + c), not a + b: the feature-only form stays what it was.
    index, mean, std, x, r, e, _ = _case(8, 4)
    loss_fn = fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C))
    a = loss_fn(x, r)
    b = F.mse_loss(e, r[:, AT : AT + C])
    assert rel_err(loss_fn(x, r, embeddings=e), (K * a + C * b) / (K + C)) <= 1e-6


def test_the_vq_led_step_through_the_cleaner(tmp_path):
    run = make_run(hybrid=True, seed=5, gap_width=C)
    w = torch.rand(run.K + C, generator=torch.Generator().manual_seed(5)) + 0.5  # one per decoder column
    cleaner = fusedvq.FeatureCleaner.from_checkpoint(write_checkpoint(tmp_path, run), norm="batch", nan_to_num=True,
                                                     num_features=sum(run.families.values()), weight=w)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, cleaner.num_features, generator=g, requires_grad=True)
    emb = torch.randn(8, C, generator=g, requires_grad=True)
    recon = torch.randn(8, cleaner.num_kept + C, generator=g, requires_grad=True)
    z = cleaner(x)
    for reduction in ("mean", "column"):
        got = cleaner.recon_loss(recon, z, reduction=reduction, embeddings=emb)
        want = F.mse_loss(recon.double(), cleaner.combine(z, emb).double(), reduction="none") * w.double()
        want = want.mean() if reduction == "mean" else want.mean(0)
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6
        grads = torch.autograd.grad(got.sum(), (x, emb, recon), retain_graph=True)
        wants = torch.autograd.grad(want.sum(), (x, emb, recon), retain_graph=True)
        assert all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, wants))


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_compiled_fullgraph_matches_eager(norm):
    torch._dynamo.reset()
    index, mean, std, x, r, e, _ = _case(12, 7)
    stats = dict(mean=mean, std=std) if norm == "stats" else {}
    loss_fn = fusedvq.VQReconLoss(index, num_features=D, norm=norm, target_gap=(AT, C), **stats)
    compiled = torch.compile(lambda x, r, e: loss_fn(x, r, embeddings=e), fullgraph=True, backend="aot_eager")
    got = compiled(x, r, e)
    grads = torch.autograd.grad(got, (x, r, e))
    want = loss_fn(x, r, embeddings=e)
    wants = torch.autograd.grad(want, (x, r, e))
    assert rel_err(got, want) <= 1e-6 and all(rel_err(a, b) <= 1e-5 for a, b in zip(grads, wants))


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
def test_opcheck_with_embeddings(use_triton):
    index, mean, std, x, r, e, g = _case(7, 8)
    cols, w = list(build_column_map(index, D)), torch.rand(K + C, generator=g)
    options = dict(nan_to_num=False, reduction=3, use_triton=use_triton, gap_at=AT, gap_width=C)
    stats = [mean[index].float(), std[index].reciprocal().float()]
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_forward.default, (x, r, cols, stats, w, e), options)
    torch.library.opcheck(torch.ops.fusedvq.batch_mse_forward.default, (x, r, cols, 1e-8, "", w, e), options)
    _, diff, finite = torch.ops.fusedvq.masked_mse_forward(x, r, cols, stats, w, e, **options)
    grad = torch.rand(K + C, generator=g)
    args = (grad, x.detach(), r.detach(), cols, stats, [diff.detach(), finite], w, e.detach())
    needs = dict(needs_x=True, needs_target=True, needs_embeddings=True)
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_backward.default, args, {**options, **needs})


def test_double_backward_through_the_composition():
    index, mean, std, x, r, e, _ = _case(5, 9, torch.float64)
    for norm in ("stats", "batch"):
        stats = dict(mean=mean, std=std) if norm == "stats" else {}
        loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm=norm, target_gap=(AT, C), backend="reference",
                                        **stats)
        assert torch.autograd.gradgradcheck(lambda x, r, e: loss_fn(x, r, embeddings=e), (x, r, e))


def test_errors_name_the_numbers():
    index, mean, std, x, r, e, _ = _case(6, 10)
    hybrid = fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 6\].*got shape \(6, 5\)"):
        hybrid(x, r, embeddings=e[:, :5])
    with pytest.raises(ValueError, match="embeddings have 5 rows but features have 6"):
        hybrid(x, r, embeddings=e[:5])
    with pytest.raises(TypeError, match="embeddings are torch.float64 but the target is torch.float32"):
        hybrid(x, r, embeddings=e.double())
    plain = fusedvq.MaskedMSELoss(index, mean, std, num_features=D)
    with pytest.raises(ValueError, match=r"no embedding columns \(target_gap=\(0, 0\)\): the target's 29 columns"):
        plain(x, r[:, :K], embeddings=e)
    wide = fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C), weight=torch.ones(K + C))
    with pytest.raises(ValueError, match=r"weight has 35 entries.*embeddings=\[B, 6\]"):
        wide(x, r)
    narrow = fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C), weight=torch.ones(K))
    with pytest.raises(ValueError, match="weight has 29 entries but .* K \\+ c = 35"):
        narrow(x, r, embeddings=e)
    with pytest.raises(ValueError, match=r"one entry per kept column \(K = 29\), or .* \(K \+ c = 35\)"):
        fusedvq.MaskedMSELoss(index, mean, std, num_features=D, target_gap=(AT, C), weight=torch.ones(30))
