"""A hybrid checkpoint's layout (the motivating project's format: ckpt_factory.make_run): where its c embedding
columns sit in the decoder, derived from the checkpoint (families and group_indices, or feature_names),
explained by `fusedvq check`, refused, never guessed, when it cannot be derived or two families or two layouts
could claim it; the losses and the cleaner built from it read the decoder's feature columns (against
tests/oracle.py's kept_z)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ckpt_factory import make_run, write_checkpoint

from fusedvq import FeatureCleaner, VQReconLoss
from fusedvq.checkpoint import CheckpointError, load_feature_spec
from helpers import BACKENDS, run_check
from oracle import kept_z, rel_err


@pytest.mark.parametrize("families", [None, {"initial": 14, "summary": 128, "temporal": 128},
                                      {"summary": 60, "temporal": 50, "initial": 14}])
def test_hybrid_layout_is_derived(tmp_path, families):
    run = make_run(hybrid=True, seed=5, families=families, gap_width=28)
    spec = load_feature_spec(write_checkpoint(tmp_path, run), num_features=sum(run.families.values()))
    p = run.gap_at
    assert spec.hybrid.gap_at == p and spec.hybrid.gap_width == 28 and spec.input_dim == run.K + 28
    cols = spec.recon_columns.numpy()
    assert np.array_equal(cols[:p], np.arange(p)) and np.array_equal(cols[p:], np.arange(p, run.K) + 28)
    assert spec.embedding_columns == range(p, p + 28)


def test_hybrid_layout_from_feature_names_alone(tmp_path):
    run = make_run(hybrid=True, seed=6)
    path = write_checkpoint(tmp_path, run, edit=lambda ck: ck.pop("pre_model_group_indices"))
    spec = load_feature_spec(path, require_stats=False)
    assert spec.hybrid.gap_at == run.gap_at and "feature_names" in spec.hybrid.source
    # Statistics need the categories in kept columns, in their own order: refused, saying why.
    with pytest.raises(CheckpointError, match="pre_model_group_indices"):
        load_feature_spec(path)


def test_underivable_hybrid_layout_says_what_is_missing(tmp_path):
    run = make_run(hybrid=True, seed=7)

    def edit(ck):
        ck.pop("pre_model_group_indices")
        ck.pop("feature_names")

    rc, out, err = run_check(str(write_checkpoint(tmp_path, run, edit=edit)), norm="batch")
    assert rc == 1 and "Traceback" not in err
    assert "cannot be derived" in err and "no pre_model_group_indices" in err and "no feature_names" in err
    assert "28 embedding columns" in err


def test_group_indices_of_two_layouts_are_refused(tmp_path):
    run = make_run(hybrid=True, seed=17)

    def edit(ck):
        groups = ck["model_config"]["group_indices"]
        name = next(n for n, g in groups.items() if len(g) > 3 and max(g) > run.gap_at + 28)
        groups[name] = [i + 1 for i in groups[name]]  # one category shifted by one column more

    rc, _, err = run_check(str(write_checkpoint(tmp_path, run, edit=edit)), norm="batch")
    assert rc == 1 and "do not describe one layout" in err


def test_embedding_width_disagreement_is_named(tmp_path):
    run = make_run(hybrid=True, seed=8)
    path = write_checkpoint(tmp_path, run, edit=lambda ck: ck["model_config"].update(input_dim=run.K + 20))
    rc, _, err = run_check(str(path))
    assert rc == 1 and "gives 28 embedding columns" in err and "leaves 20" in err


def test_feature_names_of_the_original_columns_do_not_place_the_embeddings(tmp_path):
    run = make_run(hybrid=True, seed=20)

    def edit(ck):
        ck.pop("pre_model_group_indices")
        ck["feature_names"] = [f"initial::c{i}" if i < 14 else f"x::c{i}" for i in range(270)]  # D0 names, not K

    rc, _, err = run_check(str(write_checkpoint(tmp_path, run, edit=edit)), norm="batch")
    assert rc == 1 and "cannot be derived" in err


def test_check_explains_a_hybrid_layout(tmp_path):
    run = make_run(hybrid=True, seed=9)
    p, K = run.gap_at, run.K
    rc, out, err = run_check(str(write_checkpoint(tmp_path, run)), features=270)
    assert rc == 0, err
    assert "hybrid          yes" in out and "adds 28 embedding columns" in out
    assert f"decoder {p}..{p + 27} (28 columns" in out and f"decoder {p + 28}..{K + 27} = kept {p}..{K - 1}" in out
    rc, out, err = run_check(str(tmp_path), features=187)
    assert rc == 1 and "270 entries" in err and "187" in err and "must give all 270 columns" in err


def test_a_mask_whose_kept_columns_fit_the_first_columns_says_so(tmp_path):
    run = make_run(hybrid=False, seed=10)
    run.mask[187:] = False
    run.groups = {name: idx[idx < run.K] for name, idx in run.groups.items()}  # a partition of the fewer columns
    run.mean_k, run.std_k = run.mean_k[: run.K], run.std_k[: run.K]
    rc, _, err = run_check(str(write_checkpoint(tmp_path, run)), features=187)
    assert rc == 1 and f"all {run.K} kept columns lie in the first 187" in err and "feature_mask[:187]" in err


@pytest.mark.parametrize("other", ["summary", "temporal"])  # before and after the true one in dict order
def test_two_families_encoded_by_initial_hybrid_are_refused(tmp_path, other):
    run = make_run(hybrid=True, seed=21)

    def edit(ck):  # the first in dict order must not decide where the embedding columns sit
        ck["config"]["families"][other] = {"encoder": "initial_hybrid", "encoder_params": {"cnn_embedding_dim": 28}}

    path = write_checkpoint(tmp_path, run, edit=edit)
    for norm in ("stats", "batch"):
        rc, out, err = run_check(path, features=270, norm=norm)
        assert rc == 1 and "ok: consistent" not in out
        assert f"'{other}'" in err and "'initial'" in err and "initial_hybrid" in err
    for require_stats in (True, False):
        with pytest.raises(CheckpointError, match=f"(?s)(?=.*'{other}')(?=.*'initial')"):
            load_feature_spec(path, require_stats=require_stats)
    with pytest.raises(CheckpointError, match="initial_hybrid"):
        VQReconLoss.from_checkpoint(path)
    with pytest.raises(CheckpointError, match="initial_hybrid"):
        FeatureCleaner.from_checkpoint(path, norm="batch")


def test_combine_refuses_z_of_another_width(tmp_path):
    run = make_run(hybrid=True, seed=22)
    cleaner = FeatureCleaner.from_checkpoint(write_checkpoint(tmp_path, run), norm="batch")
    x, embeddings = torch.randn(4, 270), torch.randn(4, 28)
    with pytest.raises(ValueError, match=f"(?s)(?=.*\\b270\\b)(?=.*\\b{run.K}\\b)"):
        cleaner.combine(x, embeddings)  # the raw features instead of z
    with pytest.raises(ValueError, match=f"{run.K}"):
        cleaner.combine(torch.randn(4, run.K, 1), embeddings)
    assert cleaner.combine(cleaner(x), embeddings).shape == (4, run.K + 28)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm, reduction", [("stats", "mean"), ("stats", "none"), ("batch", "sum"), ("none", "mean")])
def test_recon_loss_on_a_hybrid_compares_the_feature_columns(tmp_path, backend, norm, reduction):
    name, device = backend
    run = make_run(hybrid=True, seed=11)
    loss_fn = VQReconLoss.from_checkpoint(write_checkpoint(tmp_path, run), norm=norm, reduction=reduction, backend=name)
    loss_fn = loss_fn.to(device)
    p, c, K, B = run.gap_at, 28, run.K, 9
    mu, sigma = torch.from_numpy(run.mean_k), torch.from_numpy(run.std_k)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 270, generator=g, dtype=torch.float64)
    x[:, run.mask] = x[:, run.mask] * sigma + mu
    recon = torch.randn(B, K + c, generator=g, dtype=torch.float64)
    x, recon = x.float().to(device).requires_grad_(), recon.float().to(device).requires_grad_()
    # Oracle: float64, the plain fix on the decoder's feature columns.
    x64, r64 = x.detach().cpu().double().requires_grad_(), recon.detach().cpu().double().requires_grad_()
    z = kept_z(x64, torch.from_numpy(run.mask).nonzero().squeeze(1), mu, sigma, norm)
    feature_cols = torch.cat([torch.arange(p), torch.arange(p + c, K + c)])
    ref = F.mse_loss(r64[:, feature_cols], z, reduction=reduction)
    w = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (ref * w).sum().backward()
    got = loss_fn(x, recon)
    (got * w.to(device)).sum().backward()
    assert got.shape == ref.shape
    assert rel_err(got.detach().cpu(), ref) <= 1e-5
    assert rel_err(x.grad.cpu(), x64.grad) <= 1e-5 and rel_err(recon.grad.cpu(), r64.grad) <= 1e-5
    assert float(recon.grad[:, p : p + c].abs().max()) == 0.0  # the embedding columns: the caller's
    assert loss_fn.embedding_columns == range(p, p + c)
    with pytest.raises(ValueError, match=f"{K + c} in all"):
        loss_fn(x, recon[:, :K])


def test_feature_cleaner_on_a_hybrid(tmp_path):
    run = make_run(hybrid=True, seed=12)
    cleaner = FeatureCleaner.from_checkpoint(write_checkpoint(tmp_path, run), norm="batch")
    p, K = run.gap_at, run.K
    x = torch.randn(6, 270)
    z = cleaner(x)
    emb = torch.randn(6, 28)
    combined = cleaner.combine(z, emb)
    assert combined.shape == (6, K + 28)
    assert torch.equal(combined[:, p : p + 28], emb)
    assert torch.equal(combined[:, cleaner.recon_columns], z)
    with pytest.raises(ValueError, match=r"\[6, 28\]"):
        cleaner.combine(z, emb[:, :27])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_feature_cleaner_recon_loss_reads_the_feature_columns(tmp_path, backend, reduction):
    name, device = backend
    run = make_run(hybrid=True, seed=18)
    cleaner = FeatureCleaner.from_checkpoint(write_checkpoint(tmp_path, run), norm="batch", backend=name).to(device)
    p, K, B = run.gap_at, run.K, 7
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(B, 270, generator=g) * 3 + 1).to(device).requires_grad_()
    recon = torch.randn(B, K + 28, generator=g).to(device).requires_grad_()
    loss = cleaner.recon_loss(recon, cleaner(x), reduction=reduction)
    w = torch.rand(loss.shape, generator=g).to(device) + 0.5
    (loss * w).sum().backward()
    x64, r64 = x.detach().cpu().double().requires_grad_(), recon.detach().cpu().double().requires_grad_()
    z = kept_z(x64, torch.from_numpy(run.mask).nonzero().squeeze(1), None, None, "batch")
    cols = torch.cat([torch.arange(p), torch.arange(p + 28, K + 28)])
    ref = F.mse_loss(r64[:, cols], z, reduction=reduction)
    (ref * w.cpu().double()).sum().backward()
    assert rel_err(loss.detach().cpu(), ref) <= 1e-5
    assert rel_err(x.grad.cpu(), x64.grad) <= 1e-5 and rel_err(recon.grad.cpu(), r64.grad) <= 1e-5
    assert float(recon.grad[:, p : p + 28].abs().max()) == 0.0
    assert torch.equal(cleaner.recon_columns.cpu(), cols)
    with pytest.raises(ValueError, match=f"must have {K + 28}"):
        cleaner.recon_loss(recon[:, :K], cleaner(x))
