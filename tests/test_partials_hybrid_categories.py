"""The level-averaged per-category metric of P partial reconstructions against a hybrid's objective, in decoder
space (each category's own partials on its decoder columns, one category holding the embedding columns) against
the motivating project's loop on combine(z, embeddings); the kept feature columns' metric by name; the refusals
naming both spaces' widths; a hybrid checkpoint's gap and categories."""

import pytest
import torch

import fusedvq
from oracle import TOLERANCE, oracle_z, project_category_metric, rel_err
from ckpt_factory import make_run, write_checkpoint
from test_partials_hybrid import C, K, case


def test_category_metric_in_decoder_space():
    """category_errors of the [P, K + c] errors: each category's own partials on its decoder columns (one
    category holding the embedding columns), the project's loop on combine(z, embeddings); the mean is the
    informativeness loss; feature_category_errors of the [P, K] errors (no embeddings) is the loop on the
    kept columns; each refuses the other space's errors naming both widths."""
    levels, at = 2, 5
    cats = {"initial": [0, 1, 2, 3, 4], "summary": [5, 7, 9, 11], "temporal": [6, 8, 10, 12]}
    decoder = {"initial": [0, 1, 2, 3, 4, 5, 6, 7, 8], "summary": [9, 11, 13, 15], "temporal": [10, 12, 14, 16]}
    for dtype in (torch.float64, torch.float32):
        columns, _, _, x, partials, emb = case(7, dtype=dtype, P=len(cats) * levels, seed=4)
        fn = fusedvq.PartialsMSELoss(columns, norm="batch", reduction="column", target_gap=(at, C), categories=cats,
                                     decoder_categories=decoder, levels=levels)
        errors = fn(x, partials, embeddings=emb)
        z = oracle_z(x.double(), columns, None, None, "batch")
        combined = torch.cat([z[:, :at], emb.double(), z[:, at:]], 1)
        want = project_category_metric(partials.double(), combined, decoder, levels)
        assert rel_err(fn.category_errors(errors), want) <= TOLERANCE[dtype]
        info = sum(torch.nn.functional.mse_loss(p, combined) for p in partials.double()) / len(partials)
        assert rel_err(errors.mean(), info) <= TOLERANCE[dtype]
        kept = fn(x, partials)  # the feature columns alone: [P, K]
        keep = [k for k in range(K + C) if not at <= k < at + C]
        want = project_category_metric(partials.double()[:, :, keep], z, cats, levels)
        assert kept.shape == (len(partials), K) and rel_err(fn.feature_category_errors(kept), want) <= TOLERANCE[dtype]
    with pytest.raises(ValueError, match=rf"category_errors takes the \[6, {K + C}\].*got \[6, {K}\]"):
        fn.category_errors(kept)
    with pytest.raises(ValueError, match=rf"feature_category_errors takes the \[6, {K}\].*got \[6, {K + C}\]"):
        fn.feature_category_errors(errors)
    bare = fusedvq.PartialsMSELoss(columns, norm="batch", reduction="column", target_gap=(at, C), categories=cats,
                                   levels=levels)
    with pytest.raises(ValueError, match="no categories in decoder columns"):
        bare.category_errors(errors)


def test_hybrid_checkpoint(tmp_path):
    """From a hybrid checkpoint (the project's format): the decoder's gap and categories come from it; with the
    embeddings, the loss and the metric are the project's loop over combine(z, embeddings) (P = 4 × 3 = 12)."""
    run = make_run(hybrid=True, seed=21, families={"summary": 12, "initial": 6, "temporal": 12}, gap_width=C,
                   num_categories=4)
    fn = fusedvq.PartialsMSELoss.from_checkpoint(write_checkpoint(tmp_path, run), norm="batch", reduction="column", levels=3)
    p, W = run.gap_at, run.K + C
    assert fn.target_gap == (p, C) and fn.decoder_categories == {n: tuple(g) for n, g in run.decoder_groups().items()}
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, run.mask.shape[0], generator=g, requires_grad=True)
    partials = [torch.randn(8, W, generator=g, requires_grad=True) for _ in range(12)]
    emb = torch.randn(8, C, generator=g, requires_grad=True)
    errors = fn(x, partials, embeddings=emb)
    z = oracle_z(x.detach().double(), torch.from_numpy(run.mask), None, None, "batch")
    combined = torch.cat([z[:, :p], emb.detach().double(), z[:, p:]], 1)
    want = project_category_metric([t.detach().double() for t in partials], combined, run.decoder_groups(), 3)
    assert errors.shape == (12, W) and rel_err(fn.category_errors(errors), want) <= 1e-5
    errors.mean().backward()
    assert all(t.grad is not None for t in (x, emb, *partials))
