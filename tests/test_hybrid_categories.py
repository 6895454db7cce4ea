"""Categories as the trainer counts them: for a hybrid VQ-VAE, category_errors of the objective's [K + c]
column errors averages each category over its decoder columns (model_config's group_indices, the INITIAL
category holding the c embedding columns), as the motivating project's `{category}/reconstruction_mse`
does (tests/oracle.py's project_decoder_category_metric); feature_category_errors keeps the kept feature
columns (pre_model_group_indices); the spec, `fusedvq check` and the errors say which space they mean."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from oracle import project_decoder_category_metric, rel_err
from ckpt_factory import make_run, write_checkpoint

import fusedvq
from fusedvq.checkpoint import load_feature_spec

C = 5
FAMILIES = {"summary": 30, "initial": 6, "temporal": 30}


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    run = make_run(hybrid=True, seed=21, families=FAMILIES, gap_width=C, num_categories=4)
    return run, write_checkpoint(tmp_path_factory.mktemp("hybrid"), run)


def _inputs(run, seed, B=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, sum(FAMILIES.values()), generator=g, dtype=torch.float64)
    mu, sigma = run.mean_k.astype(np.float32), run.std_k.astype(np.float32)
    idx = torch.from_numpy(run.mask).nonzero().squeeze(1)
    x[:, idx] = x[:, idx] * torch.from_numpy(sigma).double() + torch.from_numpy(mu).double()  # z of order 1
    emb = torch.randn(B, C, generator=g)
    recon = torch.randn(B, run.K + C, generator=g)
    return x.float().requires_grad_(), emb.requires_grad_(), recon.requires_grad_(), idx, mu, sigma


def _metric(run, x, recon, emb, idx, mu, sigma, norm, groups, weight=None, at=None):
    stats = (torch.from_numpy(mu), torch.from_numpy(sigma)) if norm == "stats" else (None, None)
    return project_decoder_category_metric(x, recon, emb, idx, *stats, at=run.gap_at if at is None else at,
                                           norm=norm, decoder_categories=groups, weight=weight)


@pytest.mark.parametrize("form", ["VQReconLoss", "FeatureCleaner"])
@pytest.mark.parametrize("norm,weighted", [("stats", False), ("batch", False), ("stats", True)])
def test_category_errors_are_the_trainers_in_decoder_columns(hybrid, form, norm, weighted):
    run, path = hybrid
    K, p = run.K, run.gap_at
    x, emb, recon, idx, mu, sigma = _inputs(run, 22)
    w = torch.rand(K + C, generator=torch.Generator().manual_seed(23)) + 0.2 if weighted else None
    if form == "VQReconLoss":
        module = fusedvq.VQReconLoss.from_checkpoint(path, norm=norm, reduction="column", weight=w)
        cols = module(x, recon, embeddings=emb)
    else:
        module = fusedvq.FeatureCleaner.from_checkpoint(path, norm=norm, weight=w)
        cols = module.recon_loss(recon, module(x), reduction="column", embeddings=emb)
    assert module.category_names == tuple(run.groups)
    decoder = run.decoder_groups()  # (independent of fusedvq's reading: the trainer's own placement)
    assert module.decoder_categories == {n: tuple(g) for n, g in decoder.items()}
    errors = module.category_errors(cols)
    assert errors.shape == (len(decoder),) and errors.dtype == torch.float32
    want = _metric(run, x, recon, emb, idx, mu, sigma, norm, decoder, w)
    assert rel_err(errors, want) <= 1e-5
    initial = next(n for n, g in decoder.items() if set(range(p, p + C)) <= set(g))  # holds the embeddings
    kept_only = _metric(run, x, recon, emb, idx, mu, sigma, norm, {initial: [j for j in decoder[initial]
                                                                             if not p <= j < p + C]}, w)
    assert abs(errors[module.category_names.index(initial)].item() - kept_only.item()) > 1e-3  # not the kept mean
    (grad,) = torch.autograd.grad(errors.sum(), recon)  # differentiable, through the loss
    assert torch.isfinite(grad).all() and grad[:, p : p + C].abs().sum() > 0


def test_feature_category_errors_keep_the_kept_feature_columns(hybrid):
    run, path = hybrid
    K, p = run.K, run.gap_at
    x, emb, recon, idx, mu, sigma = _inputs(run, 24)
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column")
    kept = loss_fn.feature_category_errors(loss_fn(x, recon))  # the feature columns alone, [K]
    feature_recon = torch.cat([recon[:, :p], recon[:, p + C :]], 1)
    want = _metric(run, x, feature_recon, emb[:, :0], idx, mu, sigma, "stats", run.groups)
    assert rel_err(kept, want) <= 1e-5
    # the INITIAL category in decoder columns: its n kept columns' mean a and its c embedding columns' b
    decoder = loss_fn.category_errors(loss_fn(x, recon, embeddings=emb))
    initial = next(i for i, g in enumerate(run.decoder_groups().values()) if p in g)
    n = len(run.groups[loss_fn.category_names[initial]])
    b = (recon[:, p : p + C] - emb).double().square().mean()
    assert rel_err(decoder[initial], (n * kept[initial].double() + C * b) / (n + C)) <= 1e-5


def test_the_spec_holds_the_categories_in_both_spaces(hybrid, tmp_path):
    run, path = hybrid
    spec = load_feature_spec(path)
    assert spec.categories == {n: tuple(map(int, g)) for n, g in run.groups.items()}
    assert spec.decoder_categories == {n: tuple(g) for n, g in run.decoder_groups().items()}
    plain = make_run(hybrid=False, seed=25, families=FAMILIES, num_categories=3)
    spec = load_feature_spec(write_checkpoint(tmp_path / "plain", plain))
    assert spec.decoder_categories == spec.categories and spec.categories
    # a hybrid whose model_config lists no group_indices: no decoder-space categories, and it says so
    bare = write_checkpoint(tmp_path / "bare", run, edit=lambda ck: ck["model_config"].pop("group_indices"))
    spec = load_feature_spec(bare, require_stats=False)
    assert spec.decoder_categories == {} and spec.categories
    loss_fn = fusedvq.VQReconLoss.from_spec(spec, norm="batch", reduction="column")
    x, emb, recon, *_ = _inputs(run, 26)
    with pytest.raises(ValueError, match=rf"decoder's {run.K + C} columns .* no categories in decoder columns"):
        loss_fn.category_errors(loss_fn(x, recon, embeddings=emb))
    assert loss_fn.feature_category_errors(loss_fn(x, recon)).shape == (4,)


def test_errors_name_both_widths(hybrid):
    run, path = hybrid
    K, W = run.K, run.K + C
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column")
    x, emb, recon, *_ = _inputs(run, 27)
    with pytest.raises(ValueError, match=rf"category_errors takes the \[{W}\] column errors of the hybrid objective"
                                         rf".*got \[{K}\].*feature_category_errors"):
        loss_fn.category_errors(loss_fn(x, recon))
    with pytest.raises(ValueError, match=rf"feature_category_errors takes the \[{K}\] column errors .* got \[{W}\].*"
                                         rf"use category_errors"):
        loss_fn.feature_category_errors(loss_fn(x, recon, embeddings=emb))
    narrow = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column", weight=torch.ones(K))
    with pytest.raises(ValueError, match=rf"weight has {K} entries.*per decoder column \(K \+ c = {W}\)"):
        narrow.category_errors(torch.ones(W))


def test_decoder_categories_are_checked_not_coerced():
    mask = torch.ones(6, dtype=torch.bool)
    kept = {"a": [0, 1, 2], "b": [3, 4, 5]}

    def build(decoder, gap=(3, 2)):
        return fusedvq.MaskedMSELoss(mask, norm="none", categories=kept, decoder_categories=decoder, target_gap=gap)

    with pytest.raises(ValueError, match="category 'a' has decoder-column index 8, outside the 8 decoder columns"):
        build({"a": [0, 1, 2, 8], "b": [5, 6, 7]})
    with pytest.raises(ValueError, match="category 'b' lists decoder column 5 more than once"):
        build({"a": [0, 1, 2, 3, 4], "b": [5, 5, 6, 7]})
    with pytest.raises(TypeError, match="decoder_categories must be a mapping"):
        build([[0, 1]])
    with pytest.raises(ValueError, match="must name the same categories .* 'c' is in only one"):
        build({"a": [0, 1, 2, 3, 4], "c": [5, 6, 7]})
    with pytest.raises(ValueError, match=r"no embedding columns \(target_gap=\(0, 0\)\)"):
        build({"a": [0, 1], "b": [2, 3, 4, 5]}, gap=(0, 0))
    loss_fn = build({"b": [5, 6, 7], "a": [0, 1, 2, 3, 4]})
    assert list(loss_fn.decoder_categories) == ["a", "b"]  # in category_names' order
    g = torch.Generator().manual_seed(28)
    errors = torch.rand(8, generator=g, dtype=torch.float64)
    want = torch.stack([errors[:5].mean(), errors[5:].mean()])
    assert rel_err(loss_fn.category_errors(errors), want) <= 1e-15


@pytest.mark.parametrize("change", ["in place", "reassigned"])
def test_decoder_category_errors_follow_the_weight_buffer(change):
    mask = torch.ones(6, dtype=torch.bool)
    g = torch.Generator().manual_seed(29)
    loss_fn = fusedvq.MaskedMSELoss(mask, norm="none", categories={"a": [0, 1, 2], "b": [3, 4, 5]},
                                    decoder_categories={"a": [0, 1, 2, 3, 4], "b": [5, 6, 7]}, target_gap=(3, 2),
                                    reduction="column", weight=torch.rand(8, generator=g) + 0.1)
    errors = torch.rand(8, generator=g, dtype=torch.float64)
    loss_fn.category_errors(errors)
    new = torch.rand(8, generator=g) * 3 + 0.1
    if change == "in place":
        loss_fn.weight.copy_(new)
    else:
        loss_fn.weight = new.clone()
    w = new.double()
    want = torch.stack([(errors[:5]).sum() / w[:5].sum(), errors[5:].sum() / w[5:].sum()])
    assert rel_err(loss_fn.category_errors(errors), want) <= 1e-6


def test_check_says_which_space(hybrid):
    from fusedvq.tools.cli import check

    run, path = hybrid
    out, err = io.StringIO(), io.StringIO()
    rc = check(str(path), features=sum(FAMILIES.values()), out=out, err=err)
    out, err = out.getvalue(), err.getvalue()
    assert rc == 0, err
    assert f"listing {run.K} kept feature columns (pre_model_group_indices) and {run.K + C} decoder columns" in out
    name, cols = next(iter(run.groups.items()))
    assert any(line.split()[:6] == [name, str(len(cols)), "kept", "feature", "columns,", str(len(cols))]
               for line in out.splitlines())
