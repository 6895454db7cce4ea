"""Layouts that are never guessed, errors that name the right fix, and a checkpoint's own statistics that
stay usable beside an unrelated statistics file."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from ckpt_factory import make_parts, write_checkpoint, write_npz
from spinlock_format import make_run, write_run

import fusedvq
from fusedvq import FeatureCleaner, MaskedMSELoss, VQReconLoss
from fusedvq.checkpoint import CheckpointError, StatsNotUsedWarning, load_feature_spec
from fusedvq.tools.cli import check


def run_check(*args, **kwargs) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = check(*map(str, args), out=out, err=err, **kwargs)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return rc, out.getvalue(), err.getvalue()


# --- a hybrid layout is derived or refused, never guessed ----------------------------------------


@pytest.mark.parametrize("other", ["summary", "temporal"])  # before and after the true one in dict order
def test_two_families_encoded_by_initial_hybrid_are_refused(tmp_path, other):
    run = make_run(hybrid=True, seed=21)

    def edit(ck):  # the first in dict order must not decide where the embedding columns sit
        ck["config"]["families"][other] = {"encoder": "initial_hybrid", "encoder_params": {"cnn_embedding_dim": 28}}

    path = write_run(tmp_path, run, edit=edit)
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
    cleaner = FeatureCleaner.from_checkpoint(write_run(tmp_path, run), norm="batch")
    x, embeddings = torch.randn(4, 270), torch.randn(4, 28)
    with pytest.raises(ValueError, match=f"(?s)(?=.*\\b270\\b)(?=.*\\b{run.K}\\b)"):
        cleaner.combine(x, embeddings)  # the raw features instead of z
    with pytest.raises(ValueError, match=f"{run.K}"):
        cleaner.combine(torch.randn(4, run.K, 1), embeddings)
    assert cleaner.combine(cleaner(x), embeddings).shape == (4, run.K + 28)


# --- a statistics file that holds no statistics --------------------------------------------------


def _no_stats_npz(path):
    np.savez(path, batch_83_params=np.arange(4.0), batch_84_params=np.arange(4.0))
    return path


def test_an_npz_without_statistics_is_said_once(tmp_path):
    npz = _no_stats_npz(tmp_path / "batch.npz")
    rc, out, err = run_check(npz)
    text = out + err
    assert rc == 1 and "0 categories" not in text and "statistics file batch.npz" not in text
    assert text.count("no statistics") == 1 and "batch_83_params" in text

    path = write_checkpoint(tmp_path / "ck", make_parts(seed=1), stats_in_file=False)
    rc, out, err = run_check(path, stats=npz)
    assert rc == 1 and "for category" not in err and err.count("no statistics") == 1
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(path, stats=npz)
    assert len(info.value.problems) == 1 and "holds no statistics" in str(info.value)
    parts = make_parts(seed=1)
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(feature_mask=parts.mask, group_indices=parts.groups, stats=npz)
    assert len(info.value.problems) == 1 and "holds no statistics" in str(info.value)


# --- the constructors' index errors are the functional forms' ------------------------------------


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


# --- arguments in F.mse_loss's order --------------------------------------------------------------


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


# --- a checkpoint's own statistics beside an unrelated statistics file ---------------------------


@pytest.mark.parametrize("where", ["folder above", "same folder"])
@pytest.mark.parametrize("unrelated", ["other categories", "other numbers", "no statistics"])
def test_own_statistics_win_over_a_statistics_file_beside(tmp_path, where, unrelated):
    parts = make_parts(seed=31)
    path = write_checkpoint(tmp_path / "run" / "ck", parts)
    npz = (tmp_path / "run" if where == "folder above" else tmp_path / "run" / "ck") / "normalization_stats.npz"
    if unrelated == "other categories":
        write_npz(npz, make_parts(D=50, K=40, num_categories=3, seed=32).per_category())
    elif unrelated == "other numbers":
        shifted = parts.per_category()
        shifted["cluster_2"]["mean"] = shifted["cluster_2"]["mean"] + 1.0
        write_npz(npz, shifted)
    else:
        _no_stats_npz(npz)
    with pytest.warns(StatsNotUsedWarning, match="normalization_stats.npz") as caught:
        spec = load_feature_spec(path, num_features=187)
    assert len(caught) == 1 and str(npz) in str(caught[0].message)
    assert torch.equal(spec.mean, torch.from_numpy(parts.mean_k)) and "checkpoint" in spec.stats_source
    with pytest.warns(StatsNotUsedWarning):
        MaskedMSELoss.from_checkpoint(path)
    rc, out, err = run_check(path, features=187)
    assert rc == 0 and "ok: consistent" in out and "note:" in out and "normalization_stats.npz" in out, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_feature_spec(path, stats="checkpoint")  # chosen: nothing to warn about
        if unrelated == "other numbers":  # an explicit file still wins
            spec = load_feature_spec(path, stats=npz)
            assert not torch.equal(spec.mean, torch.from_numpy(parts.mean_k))


def test_agreeing_statistics_beside_give_no_note(tmp_path):
    parts = make_parts(seed=33)
    path = write_checkpoint(tmp_path, parts, stats_beside=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_feature_spec(path)
    rc, out, _ = run_check(path)
    assert rc == 0 and "note:" not in out


# --- the regrouped call path: what a review of it found ---------------------------------------------


def test_options_of_another_form_are_refused():
    x, mask = torch.randn(8, 6), torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    with pytest.raises(TypeError, match="unknown option 'reduction'"):
        fusedvq.clean_features(x, mask, norm="none", reduction="sum")
    with pytest.raises(TypeError, match="unknown option 'gap'"):
        fusedvq.masked_mse(x, torch.randn(8, 4), mask, norm="none", gap=(1, 2))
    for name, value in (("target_gap", (1, 2)), ("reduction", "sum")):
        with pytest.raises(TypeError, match=f"unknown option '{name}'"):
            FeatureCleaner(mask, norm="none", **{name: value})


def test_a_module_mask_of_another_length_names_num_features():
    with pytest.raises(ValueError, match="feature_mask has 6 entries but num_features=8"):
        MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="none", num_features=8)


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
