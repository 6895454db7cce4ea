"""Every bad input gets a clear error naming the numbers, raised before any kernel runs."""

import re

import pytest
import torch

import fusedvq


def _case(B=4, D=187, K=171):
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:K] = True
    return torch.randn(B, D), torch.randn(B, K), mask, torch.randn(D), torch.rand(D) + 0.5


def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def test_target_width_names_both_numbers_171_187():
    x, _, mask, mean, std = _case()
    with raises(ValueError, "target has 187 columns", "keeps 171 of the 187 feature columns",
                "decoder's 171-column reconstruction"):
        fusedvq.masked_mse(x, torch.randn(4, 187), mask, mean, std)


def test_target_width_with_integer_index():
    x, _, _, mean, std = _case()
    with raises(ValueError, "target has 170 columns", "index keeps 171 of the 187"):
        fusedvq.masked_mse(x, torch.randn(4, 170), torch.arange(171), mean, std)


def test_module_target_width():
    x, _, mask, mean, std = _case()
    loss = fusedvq.MaskedMSELoss(mask, mean, std)
    with raises(ValueError, "target has 187 columns", "keeps 171 of the 187"):
        loss(x, torch.randn(4, 187))


def test_mask_length_differs_from_features():
    x, r, _, mean, std = _case()
    mask = torch.ones(270, dtype=torch.bool)
    with raises(ValueError, "feature_mask has 270 entries", "features have 187 columns"):
        fusedvq.masked_mse(x, r, mask, mean, std)


def test_module_features_width():
    _, r, mask, mean, std = _case()
    loss = fusedvq.MaskedMSELoss(mask, mean, std)
    with raises(ValueError, "features have 270 columns", "built for 187 feature columns"):
        loss(torch.randn(4, 270), r)


@pytest.mark.parametrize("bad", [187, -1, 1000])
def test_index_out_of_range(bad):
    x, r, _, mean, std = _case()
    index = torch.arange(171)
    index[5] = bad
    with raises(ValueError, f"index holds {bad}", "[0, 186]"):
        fusedvq.masked_mse(x, r, index, mean, std)


def test_module_index_out_of_range_at_construction():
    with raises(ValueError, "index holds 200", "[0, 186]"):
        fusedvq.MaskedMSELoss(torch.tensor([0, 200]), torch.zeros(187), torch.ones(187), num_features=187)


def test_index_not_1d_and_not_integer():
    x, r, _, mean, std = _case()
    with raises(ValueError, "index must be 1-D", "(1, 171)"):
        fusedvq.masked_mse(x, r, torch.arange(171)[None], mean, std)
    with raises(TypeError, "bool mask or integer column indices", "torch.float32"):
        fusedvq.masked_mse(x, r, torch.arange(171).float(), mean, std)


def test_batch_sizes_differ():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features have 4 rows but target has 5"):
        fusedvq.masked_mse(x, torch.randn(5, 171), mask, mean, std)


def test_empty_batch():
    _, _, mask, mean, std = _case()
    with raises(ValueError, "0 rows"):
        fusedvq.masked_mse(torch.randn(0, 187), torch.randn(0, 171), mask, mean, std)


def test_devices_differ():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features are on cpu but target is on meta"):
        fusedvq.masked_mse(x, r.to("meta"), mask, mean, std)


def test_dtypes():
    x, r, mask, mean, std = _case()
    with raises(TypeError, "features must be floating point", "torch.int64"):
        fusedvq.masked_mse(x.long(), r, mask, mean, std)
    with raises(TypeError, "share one dtype", "torch.float32", "torch.float16"):
        fusedvq.masked_mse(x, r.half(), mask, mean, std)
    with raises(TypeError, 'backend="triton" supports float32, float16 and bfloat16', "torch.float64"):
        fusedvq.masked_mse(x.double(), r.double(), mask, mean, std, backend="triton")


def test_wrong_ndim():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features must be 2-D", "(4, 187, 1)"):
        fusedvq.masked_mse(x[..., None], r, mask, mean, std)
    with raises(ValueError, "target must be 2-D", "(684,)"):
        fusedvq.masked_mse(x, r.reshape(-1), mask, mean, std)


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


@pytest.mark.parametrize("option,value", [("reduction", "avg"), ("norm", "layer"), ("backend", "cuda")])
def test_unknown_options(option, value):
    x, r, mask, mean, std = _case()
    with raises(ValueError, f"unknown {option}={value!r}"):
        fusedvq.masked_mse(x, r, mask, mean, std, **{option: value})


def test_triton_backend_on_cpu_without_interpreter_in_subprocess():
    import subprocess
    import sys

    code = (
        "import torch, fusedvq\n"
        "m = torch.ones(4, dtype=torch.bool)\n"
        "try:\n"
        "    fusedvq.masked_mse(torch.randn(2, 4), torch.randn(2, 4), m, norm='none', backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert 'backend="triton" needs CUDA tensors' in out.stdout, out.stderr


def test_integer_index_module_needs_num_features():
    with raises(ValueError, "num_features"):
        fusedvq.MaskedMSELoss(torch.arange(3), norm="none")


def test_module_on_wrong_device():
    x, r, mask, mean, std = _case()
    loss = fusedvq.MaskedMSELoss(mask, mean, std).to("meta")
    with raises(ValueError, "features are on cpu but the module's buffers are on meta: call .to('cpu') on the module"):
        loss(x, r)
