"""Every bad input gets a clear error naming the numbers, raised before any kernel runs: the widths,
lengths, batch sizes, dtypes, devices and layouts of the features, the target and the mask or index, an
index that is not one, and arguments given in the wrong order; traced, an index outside the features is
refused on the device. (The statistics: test_errors_stats.py; the options: test_strict_arguments.py.)"""

import pytest
import torch

import fusedvq
from fusedvq import FeatureCleaner, MaskedMSELoss, VQReconLoss
from helpers import needs_interpreter, raises


def _case(B=4, D=187, K=171):
    mask = torch.zeros(D, dtype=torch.bool)
    mask[:K] = True
    return torch.randn(B, D), torch.randn(B, K), mask, torch.randn(D), torch.rand(D) + 0.5


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


def test_a_module_mask_of_another_length_names_num_features():
    with pytest.raises(ValueError, match="feature_mask has 6 entries but num_features=8"):
        MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="none", num_features=8)


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


def test_integer_index_module_needs_num_features():
    with raises(ValueError, "num_features"):
        fusedvq.MaskedMSELoss(torch.arange(3), norm="none")


def test_uint8_mask_is_refused():
    x, r = torch.randn(4, 10), torch.randn(4, 10)
    with raises(TypeError, "uint8", "mask.bool()"):
        fusedvq.masked_mse(x, r, torch.ones(10, dtype=torch.uint8), norm="none")
    with raises(TypeError, "uint8", "mask.bool()"):
        fusedvq.MaskedMSELoss(torch.ones(10, dtype=torch.uint8), num_features=10, norm="none")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_zero_one_integer_mask_of_length_d_is_refused(dtype):
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=dtype)
    x, r = torch.randn(4, 10), torch.randn(4, 10)
    with raises(ValueError, "only 0s and 1s", "10 entries", "mask.bool()"):
        fusedvq.masked_mse(x, r, mask, norm="none")
    with raises(ValueError, "only 0s and 1s", "mask.bool()"):
        fusedvq.MaskedMSELoss(mask, num_features=10, norm="none")


def test_permutation_of_two_columns_is_still_an_index():
    x, r = torch.randn(4, 2), torch.randn(4, 2)
    loss = fusedvq.masked_mse(x, r, torch.tensor([1, 0]), norm="none")
    assert torch.allclose(loss, torch.nn.functional.mse_loss(x[:, [1, 0]], r))


def _mask(D=187, K=171):
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=torch.Generator().manual_seed(0))[:K]] = True
    return mask


@pytest.mark.parametrize("convert", ["float", "double", "long", "int", "uint8"])
def test_constructor_index_errors_are_the_functional_ones(convert):
    index = getattr(_mask(), convert)() if convert != "uint8" else _mask().to(torch.uint8)
    x, r = torch.randn(4, 187), torch.randn(4, 171)
    with pytest.raises((TypeError, ValueError)) as functional:
        fusedvq.masked_mse(x, r, index, norm="none")
    with pytest.raises((TypeError, ValueError)) as clean:
        fusedvq.clean_features(x, index, norm="none")
    assert "mask.bool()" in str(functional.value) and str(clean.value) == str(functional.value)
    for make in (lambda: MaskedMSELoss(index, norm="none"), lambda: FeatureCleaner(index, norm="batch"),
                 lambda: VQReconLoss(index, norm="none"), lambda: MaskedMSELoss(index, num_features=187, norm="none")):
        with pytest.raises((TypeError, ValueError)) as module:
            make()
        assert "num_features" not in str(module.value)
        assert type(module.value) is type(functional.value) and str(module.value) == str(functional.value)


def test_swapped_arguments_are_named():
    mask = _mask()
    x, r = torch.randn(4, 187), torch.randn(4, 171)
    calls = {
        "masked_mse": lambda a, b: fusedvq.masked_mse(a, b, mask, norm="none"),
        "masked_mse indices": lambda a, b: fusedvq.masked_mse(a, b, mask.nonzero().squeeze(1), norm="none"),
        "MaskedMSELoss": lambda a, b: MaskedMSELoss(mask, norm="batch")(a, b),
        "VQReconLoss": lambda a, b: VQReconLoss(mask, norm="batch")(a, b),
    }
    for name, call in calls.items():
        call(x, r)  # the right order runs
        with pytest.raises(ValueError, match="look swapped") as info:
            call(r, x)
        assert "[B, 187]" in str(info.value) and "[B, 171]" in str(info.value), name
    hybrid = MaskedMSELoss(mask, norm="none", target_gap=(5, 28))
    with pytest.raises(ValueError, match="look swapped"):
        hybrid(torch.randn(4, 199), x)
    # Widths that are merely wrong are not called swapped.
    with pytest.raises(ValueError) as info:
        fusedvq.masked_mse(torch.randn(4, 170), x, mask, norm="none")
    assert "swapped" not in str(info.value)


def test_batch_sizes_differ():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features have 4 rows but target has 5"):
        fusedvq.masked_mse(x, torch.randn(5, 171), mask, mean, std)


def test_empty_batch():
    _, _, mask, mean, std = _case()
    with raises(ValueError, "0 rows"):
        fusedvq.masked_mse(torch.randn(0, 187), torch.randn(0, 171), mask, mean, std)


def test_wrong_ndim():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features must be 2-D", "(4, 187, 1)"):
        fusedvq.masked_mse(x[..., None], r, mask, mean, std)
    with raises(ValueError, "target must be 2-D", "(684,)"):
        fusedvq.masked_mse(x, r.reshape(-1), mask, mean, std)


def test_dtypes():
    x, r, mask, mean, std = _case()
    with raises(TypeError, "features must be floating point", "torch.int64"):
        fusedvq.masked_mse(x.long(), r, mask, mean, std)
    with raises(TypeError, "share one dtype", "torch.float32", "torch.float16"):
        fusedvq.masked_mse(x, r.half(), mask, mean, std)
    with raises(TypeError, 'backend="triton" supports float32, float16 and bfloat16', "torch.float64"):
        fusedvq.masked_mse(x.double(), r.double(), mask, mean, std, backend="triton")


def _layouts():
    x = torch.randn(4, 6)
    return {
        "coo": x.to_sparse(),
        "csr": x.to_sparse_csr(),
        "nested": torch.nested.nested_tensor([torch.randn(6), torch.randn(6)]),
        "meta": torch.empty(4, 6, device="meta"),
    }


@pytest.mark.parametrize("layout", ["coo", "csr", "nested", "meta"])
@pytest.mark.parametrize("role", ["features", "target", "index", "mean"])
def test_unsupported_layouts_and_meta_get_a_clear_error(layout, role):
    x, r, index = torch.randn(4, 6), torch.randn(4, 6), torch.arange(6)
    mean, std = torch.zeros(6), torch.ones(6)
    odd = _layouts()[layout]
    if role == "features":
        x = odd
    elif role == "target":
        r = odd
    elif role == "index":
        index = odd.to(torch.int64) if layout != "nested" else torch.nested.nested_tensor([torch.arange(3)] * 2)
    else:
        mean = odd[0] if layout in ("meta",) else odd
    words = {"coo": "sparse", "csr": "sparse", "nested": "nested", "meta": "meta device"}[layout]
    with pytest.raises((TypeError, ValueError), match=words):
        fusedvq.masked_mse(x, r, index, mean, std, stats_space="masked")


def test_devices_differ():
    x, r, mask, mean, std = _case()
    with raises(ValueError, "features are on cpu but target is on meta"):
        fusedvq.masked_mse(x, r.to("meta"), mask, mean, std)


def test_module_on_wrong_device():
    x, r, mask, mean, std = _case()
    loss = fusedvq.MaskedMSELoss(mask, mean, std).to("meta")
    with raises(ValueError, "features are on cpu but the module's buffers are on meta: call .to('cpu') on the module"):
        loss(x, r)


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


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0: enough to see where the functional forms put the index."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA test below runs instead")
def test_the_functional_forms_move_the_index_to_the_features_device():
    """masked_mse / clean_features take the index where it is given (a CPU mask, a list) and move it to the
    features' device: here that move is what fails (no CUDA), not a complaint about a module's buffers."""
    x, r = torch.randn(8, 6).as_subclass(_ClaimsCuda), torch.randn(8, 4).as_subclass(_ClaimsCuda)
    mask = torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    for call in (lambda: fusedvq.masked_mse(x, r, mask, norm="none", backend="reference"),
                 lambda: fusedvq.clean_features(x, mask.tolist(), norm="none", backend="reference")):
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            call()


@pytest.mark.gpu
def test_a_cpu_mask_with_cuda_features():
    x, r = torch.randn(8, 6, device="cuda"), torch.randn(8, 4, device="cuda")
    mask = torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    want = torch.nn.functional.mse_loss(x[:, mask.cuda()], r)
    assert torch.allclose(fusedvq.masked_mse(x, r, mask, norm="none"), want)
    assert fusedvq.clean_features(x, mask.tolist(), norm="none").device.type == "cuda"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("bad", [12, -1])
def test_compiled_out_of_range_index_fails(backend, bad):
    """Traced, an index outside [0, D) fails on the device instead of dropping the column (the bug: the
    Triton loss skipped it and left grad_target's column unwritten). (aot_eager: the device-side assertion
    through inductor is test_op.py's mask check with --sweeps, the same torch._assert_async.)"""
    torch._dynamo.reset()
    a, b = torch.randn(5, 12), torch.randn(5, 3)
    index = torch.tensor([0, 1, bad])
    f = torch.compile(lambda a, b: fusedvq.masked_mse(a, b, index, norm="none", backend=backend), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(RuntimeError, match="outside the feature columns"):
        f(a, b)
