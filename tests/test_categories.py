"""Categories: per-category errors from the loss's own column errors, weights given per category
("balanced", by name), the Gini balance score, and the checks that keep category input from being
coerced. Oracles: float64 compositions of plain torch ops (tests/oracle.py's column_oracle and
category_oracle, F.mse_loss)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusedvq
from helpers import interpreting
from oracle import category_oracle, column_oracle, rel_err


@pytest.fixture
def checkpoint(tmp_path):
    from ckpt_factory import make_plain_run, write_checkpoint

    parts = make_plain_run(sizes=[60, 3, 40, 20, 12, 9, 17, 10])  # a 3-column category beside 60-column ones
    return write_checkpoint(tmp_path, parts), parts


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_category_errors_by_name_in_the_checkpoint_order(checkpoint, norm):
    path, parts = checkpoint
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path, norm=norm, reduction="column")
    assert loss_fn.category_names == tuple(parts.groups)  # the checkpoint's group_indices order
    assert loss_fn.category_names == tuple(f"cluster_{i}" for i in range(1, 9))
    g = torch.Generator().manual_seed(8)
    x, recon = torch.randn(32, parts.D, generator=g), torch.randn(32, parts.K, generator=g)
    cols = loss_fn(x, recon)
    errors = loss_fn.category_errors(cols)
    assert errors.shape == (8,) and errors.dtype == torch.float32
    assert rel_err(errors, category_oracle(cols, parts.groups, None)) <= 1e-6
    # and against per-category F.mse_loss of the plain fix, as the motivating trainer logs them
    z = (x[:, torch.from_numpy(parts.mask)].double() - torch.from_numpy(parts.mean_k)) / torch.from_numpy(parts.std_k)
    if norm == "batch":
        xk = x[:, torch.from_numpy(parts.mask)].double()
        z = (xk - xk.mean(0)) / xk.std(0)
    plain = torch.stack([F.mse_loss(z[:, list(idx)], recon[:, list(idx)].double()) for idx in parts.groups.values()])
    assert rel_err(errors, plain) <= 1e-5


def test_a_category_a_plain_mean_hides(checkpoint):
    path, parts = checkpoint
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, parts.D, generator=g)
    z = (x[:, torch.from_numpy(parts.mask)].double() - torch.from_numpy(parts.mean_k)) / torch.from_numpy(parts.std_k)
    recon = (z + 0.01 * torch.randn(z.shape, generator=g, dtype=torch.float64)).float()
    small = list(parts.groups["cluster_2"])  # 3 of 171 columns, reconstructed with an error of 1 each
    recon[:, small] += 1.0
    cols = loss_fn(x, recon)
    errors = loss_fn.category_errors(cols)
    assert cols.mean() < 0.05 and errors[1] > 0.5 and (errors[torch.arange(8) != 1] < 1e-3).all()
    assert fusedvq.gini(errors) > 0.8


def test_balanced_and_named_weights(checkpoint):
    path, parts = checkpoint
    K, names = parts.K, list(parts.groups)
    g = torch.Generator().manual_seed(10)
    x, recon = torch.randn(16, parts.D, generator=g), torch.randn(16, K, generator=g)
    balanced = fusedvq.VQReconLoss.from_checkpoint(path, weight="balanced")
    per_column = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column", weight="balanced")
    plain_cols = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column")(x, recon)
    category_mse = category_oracle(plain_cols, parts.groups, None)
    # every category weighs the same: the mean loss is the mean of the category errors
    assert rel_err(balanced(x, recon), category_mse.mean()) <= 1e-6
    assert rel_err(per_column.category_errors(per_column(x, recon)), category_mse) <= 1e-6  # still each one's MSE
    w = balanced.loss.weight.double()
    assert abs(w.sum().item() - K) < 1e-4 and len({round(float(w[list(i)].sum()), 4) for i in parts.groups.values()}) == 1
    named = fusedvq.VQReconLoss.from_checkpoint(path, weight={names[1]: 5.0, names[4]: 0.0})
    want = torch.ones(K, dtype=torch.float64)
    want[list(parts.groups[names[1]])] = 5.0
    want[list(parts.groups[names[4]])] = 0.0
    assert torch.equal(named.loss.weight.double(), want)
    assert rel_err(named(x, recon), (plain_cols.double() * want).mean()) <= 1e-6
    zero = named.loss.category_errors(fusedvq.VQReconLoss.from_checkpoint(
        path, reduction="column", weight={names[4]: 0.0})(x, recon))
    assert torch.isnan(zero[4]) and torch.isfinite(zero[torch.arange(8) != 4]).all()
    with pytest.raises(ValueError, match="'nope', which the VQ-VAE does not have: its categories are 'cluster_1'"):
        fusedvq.VQReconLoss.from_checkpoint(path, weight={"nope": 1.0})
    with pytest.raises(ValueError, match="weight of category 'cluster_1' must be a finite number >= 0, got -1"):
        fusedvq.VQReconLoss.from_checkpoint(path, weight={"cluster_1": -1})


def test_balanced_needs_a_partition():
    mask = torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="kept column 4 is in 0 of them"):
        fusedvq.MaskedMSELoss(mask, norm="none", categories={"a": [0, 1, 2, 3], "b": [5, 6, 7, 8, 9]},
                              weight="balanced")
    with pytest.raises(ValueError, match="category 'a' has kept-column index 10, outside the 10 kept columns"):
        fusedvq.MaskedMSELoss(mask, norm="none", categories={"a": [10]})


def test_category_errors_refuse_what_is_not_columns(checkpoint):
    path, parts = checkpoint
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path)
    with pytest.raises(ValueError, match='takes the \\[171\\] column errors of reduction="column", got \\[\\]'):
        loss_fn.category_errors(torch.tensor(1.0))
    with pytest.raises(ValueError, match="has no categories"):
        fusedvq.MaskedMSELoss(torch.ones(5, dtype=torch.bool), norm="none").category_errors(torch.ones(5))


def test_category_errors_keep_a_nan_column_in_its_category(checkpoint):
    path, parts = checkpoint
    loss_fn = fusedvq.VQReconLoss.from_checkpoint(path, reduction="column")
    cols = torch.rand(parts.K)
    cols[parts.groups["cluster_3"][0]] = float("nan")
    errors = loss_fn.category_errors(cols)
    assert torch.isnan(errors[2]) and torch.isfinite(errors[torch.arange(8) != 2]).all()


def test_gini():
    assert fusedvq.gini(torch.ones(8)).item() == 0.0
    assert abs(fusedvq.gini(torch.tensor([0.0, 0, 0, 1])).item() - 0.75) < 1e-7
    assert fusedvq.gini(torch.zeros(3)).item() == 0.0
    v = torch.rand(8, dtype=torch.float64)
    pairs = (v[:, None] - v[None, :]).abs().sum() / (2 * 8 * v.sum())  # mean absolute difference form
    assert abs(fusedvq.gini(v).item() - pairs.item()) < 1e-12


# ------------------------------------------------------------------------------ the VQ-led step's form


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("hybrid", [False, True])
def test_cleaner_recon_loss_columns_weights_and_categories(backend, hybrid, tmp_path):
    from ckpt_factory import make_plain_run, write_checkpoint

    from fusedvq.kernels.plan import Gap

    parts = make_plain_run(seed=11)
    cleaner = fusedvq.FeatureCleaner.from_checkpoint(write_checkpoint(tmp_path, parts), norm="batch",
                                                     nan_to_num=True, backend=backend, weight="balanced")
    if hybrid:  # the decoder's output with 6 embedding columns from column 50 on
        cleaner._z_plan = cleaner._z_plan._replace(gap=Gap(50, 6))
    K = parts.K
    g = torch.Generator().manual_seed(12)
    x = torch.randn(8, parts.D, generator=g, requires_grad=True)
    recon = torch.randn(8, K + (6 if hybrid else 0), generator=g, requires_grad=True)
    z = cleaner(x)
    cols = cleaner.recon_loss(recon, z, reduction="column")
    mean = cleaner.recon_loss(recon, z)
    assert cols.shape == (K,) and abs(cols.mean().item() - mean.item()) <= 1e-6 * mean.item()
    rk = torch.cat([recon[:, :50], recon[:, 56:]], 1) if hybrid else recon
    w = cleaner._z_plan.weight
    e = (z.double() - rk.double()).square() * w.double()
    assert rel_err(cols, e.mean(0)) <= 1e-6
    plain = ((z.double() - rk.double()).square()).mean(0)
    assert rel_err(cleaner.category_errors(cols), category_oracle(plain, parts.groups, None)) <= 1e-6
    gx, gr = torch.autograd.grad(cols.mean(), (x, recon), retain_graph=True)
    gx_ref, gr_ref = torch.autograd.grad(e.mean(), (x, recon))
    assert rel_err(gx, gx_ref) <= 1e-5 and rel_err(gr, gr_ref) <= 1e-5




# ------------------------------------------------------------------- nothing stale, nothing coerced


@pytest.mark.parametrize("change", ["in place", "reassigned"])
def test_category_errors_follow_the_weight_buffer(change):
    g = torch.Generator().manual_seed(40)
    D, K = 23, 15
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=g)[:K]] = True
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    groups = {"a": [0, 3, 5, 14], "b": [1, 2, 4, 6, 7, 8, 9], "c": [10, 11, 12, 13]}
    loss_fn = fusedvq.MaskedMSELoss(mask, mean, std, reduction="column", categories=groups,
                                    weight=torch.rand(K, generator=g) + 0.1)
    x, r = torch.randn(9, D, generator=g) * std + mean, torch.randn(9, K, generator=g)
    loss_fn.category_errors(loss_fn(x, r))  # (a first call, before the weights change)
    new = torch.rand(K, generator=g) * 3 + 0.1
    if change == "in place":
        loss_fn.weight.copy_(new)
    else:
        loss_fn.weight = new.clone()
    errors = loss_fn.category_errors(loss_fn(x, r))
    columns, _, _ = column_oracle(x, r, mask, mean, std, torch.ones(K), norm="stats", reduction="column", weight=new)
    assert rel_err(errors, category_oracle(columns, groups, new)) <= 1e-6


def test_balanced_refuses_a_column_listed_twice():
    mask = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="category 'a' lists kept column 1 more than once"):
        fusedvq.MaskedMSELoss(mask, norm="none", categories={"a": [0, 1, 1], "b": [2, 3, 4, 5]}, weight="balanced")
    # the property "balanced" promises, on a partition: the mean loss is the mean of the category errors
    g = torch.Generator().manual_seed(41)
    x, r, groups = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g), {"a": [0, 1], "b": [2, 3, 4, 5]}
    loss = fusedvq.MaskedMSELoss(mask, norm="none", categories=groups, weight="balanced")(x, r)
    e = F.mse_loss(x.double(), r.double(), reduction="none")
    assert rel_err(loss, torch.stack([e[:, i].mean() for i in groups.values()]).mean()) <= 1e-6


@pytest.mark.parametrize("categories,error,message", [
    ([[0, 1]], TypeError, "categories must be a mapping {name: kept-column indices}"),
    ({"a": [0.5, 1.7]}, TypeError, "category 'a' must list kept-column indices .* got float 0.5"),
    ({"a": np.array([0.0, 1.0])}, TypeError, "category 'a' must list kept-column indices .* float64"),
    ({"a": [True, False, True, False]}, TypeError, "category 'a' .* got booleans .*a mask"),
    ({"a": torch.tensor([True, False, True])}, TypeError, "category 'a' .*a boolean mask"),
    ({"a": "012"}, TypeError, "category 'a' must list kept-column indices .* got str '012'"),
    ({"a": 3}, TypeError, "category 'a' must list kept-column indices .* got int 3"),
    ({"a": [[0, 1]]}, TypeError, "category 'a' must list kept-column indices .* got list \\[0, 1\\]"),
    ({1: [0, 1], "1": [2, 3]}, TypeError, "category names must be strings, got int 1"),
    ({"a": [0, 6]}, ValueError, "category 'a' has kept-column index 6, outside the 6 kept columns"),
    ({"a": []}, ValueError, "category 'a' has no kept columns"),
    ({"a": [2, 0, 2]}, ValueError, "category 'a' lists kept column 2 more than once"),
])
def test_categories_are_checked_not_coerced(categories, error, message):
    with pytest.raises(error, match=message):
        fusedvq.MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="none", categories=categories)


def test_categories_take_integer_indices_in_any_container():
    given = {"a": np.array([0, 4]), "b": torch.tensor([1, 2], dtype=torch.int32), "c": range(3, 4), "d": (5,)}
    loss_fn = fusedvq.MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="none", categories=given)
    assert loss_fn.categories == {"a": (0, 4), "b": (1, 2), "c": (3,), "d": (5,)}
    assert all(type(i) is int for idx in loss_fn.categories.values() for i in idx)


def test_category_errors_take_floating_errors_of_the_module():
    loss_fn = fusedvq.MaskedMSELoss(torch.ones(4, dtype=torch.bool), norm="none", reduction="column",
                                    categories={"a": [0, 1], "b": [2, 3]})
    for bad in (torch.tensor([1, 2, 3, 4]), torch.tensor([True, False, True, True])):
        with pytest.raises(TypeError, match=f"floating-point column errors .* got {bad.dtype}"):
            loss_fn.category_errors(bad)
    with pytest.raises(ValueError, match="column errors are on meta but the module's buffers on cpu"):
        loss_fn.category_errors(torch.ones(4, device="meta"))
    errors = torch.rand(4, dtype=torch.float64)
    assert rel_err(loss_fn.category_errors(errors), torch.stack([errors[:2].mean(), errors[2:].mean()])) <= 1e-15


@pytest.mark.parametrize("bad", [[-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 2.0], [0.5, -0.0001, 3.0]])
def test_gini_refuses_negative_or_non_finite_values(bad):
    with pytest.raises(ValueError, match="gini takes values that are finite and >= 0"):
        fusedvq.gini(torch.tensor(bad))
    with pytest.raises(TypeError, match="real values"):
        fusedvq.gini(torch.tensor([True, False]))


def test_gini_stays_in_the_unit_interval():
    g = torch.Generator().manual_seed(42)
    for n in range(2, 50):
        v = float(torch.rand((), generator=g, dtype=torch.float64)) * 10 ** int(torch.randint(-8, 8, (), generator=g))
        equal = fusedvq.gini(torch.full((n,), v, dtype=torch.float64))
        assert equal.item() == 0.0  # equal values: exactly 0, never a rounding −1e-17
        skewed = fusedvq.gini(torch.rand(n, generator=g, dtype=torch.float64) ** 8)
        assert 0.0 <= skewed.item() <= 1.0
