"""The statistics are checked before any kernel runs, each error naming the value and the column: μ and σ
of length D (raw) or K (masked, said with stats_space where D == K), σ finite and > 0 in the kept columns
(a dropped column's σ is not read), values the compute dtype can hold, given when norm="stats" needs them
and only then, and never requiring grad."""

import pytest
import torch

import fusedvq
from helpers import raises
from oracle import rel_err


def _case(B=4, D=187, K=171):
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:K] = True
    return torch.randn(B, D), torch.randn(B, K), mask, torch.randn(D), torch.rand(D) + 0.5


def test_stats_length_neither_d_nor_k():
    x, r, mask, _, std = _case()
    with raises(ValueError, "mean has 100 entries", "D = 187", "K = 171"):
        fusedvq.masked_mse(x, r, mask, torch.zeros(100), std)


def test_stats_ambiguous_when_d_equals_k():
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    mask = torch.ones(8, dtype=torch.bool)
    with raises(ValueError, "D == K == 8", "stats_space"):
        fusedvq.masked_mse(x, r, mask, torch.zeros(8), torch.ones(8))
    fusedvq.masked_mse(x, r, mask, torch.zeros(8), torch.ones(8), stats_space="masked")


def test_stats_space_contradicts_length():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "mean has 187 entries", "stats_space='masked' expects 171"):
        fusedvq.masked_mse(x, r, mask, mean, std, stats_space="masked")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_std_must_be_positive_and_finite_in_kept_columns(bad):
    x, r, mask, mean, std = _case()
    std[10] = bad
    with raises(ValueError, "std must be finite and > 0", "feature column 10", str(bad)):
        fusedvq.masked_mse(x, r, mask, mean, std)
    with raises(ValueError, "std must be finite and > 0"):
        fusedvq.MaskedMSELoss(mask, mean, std)


def test_std_of_dropped_columns_is_not_checked():
    # A VQ-VAE's cleaning drops constant columns: their σ = 0 is irrelevant.
    x, r, mask, mean, std = _case()
    std[180] = 0.0
    assert torch.isfinite(fusedvq.masked_mse(x, r, mask, mean, std))


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


def test_missing_or_unused_stats():
    x, r, mask, mean, std = _case()
    with raises(ValueError, 'norm="stats" needs mean and std', "std not given"):
        fusedvq.masked_mse(x, r, mask, mean)
    with raises(ValueError, "mean was given but norm='none'"):
        fusedvq.masked_mse(x, r, mask, mean, std, norm="none")


def test_stats_requiring_grad_are_refused():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "mean requires grad", "mean.detach()"):
        fusedvq.masked_mse(x, r, mask, mean.requires_grad_(), std)
