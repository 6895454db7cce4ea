"""The checkpoint loader: formats in the wild, statistics placement, safety against pickled code."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ckpt_factory import Evil, fixture_layout, make_plain_run, shared_dir, write_checkpoint, write_npz

from fusedvq.checkpoint import (
    CheckpointError,
    UnsafeLoadWarning,
    diagnose,
    load_feature_spec,
    read_checkpoint,
)
from fusedvq.loss import MaskedMSELoss

FIXTURES = shared_dir() / "fixtures" / "spinlock"


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["standard", "mad"])
@pytest.mark.parametrize("where", ["in_file", "beside", "run_folder", "explicit"])
def test_loader_places_per_category_stats(tmp_path, method, where):
    parts = make_plain_run(method=method, seed=3)
    folder = tmp_path / "run" / "checkpoints" if where == "run_folder" else tmp_path / "run"
    path = write_checkpoint(folder, parts, stats_in_file=where == "in_file", stats_beside=where == "beside")
    stats = None
    if where == "run_folder":  # the trainer's layout: run/normalization_stats.npz, run/checkpoints/best_model.pt
        write_npz(tmp_path / "run" / "normalization_stats.npz", parts.per_category(), method)
    if where == "explicit":
        stats = write_npz(tmp_path / "elsewhere.npz", parts.per_category(), method)

    spec = load_feature_spec(path, stats=stats)

    assert (spec.num_features, spec.num_kept, spec.input_dim) == (187, 171, 171)
    assert torch.equal(spec.feature_mask, torch.from_numpy(parts.mask))
    assert spec.index.tolist() == np.flatnonzero(parts.mask).tolist()
    assert spec.method == method
    assert {k: len(v) for k, v in spec.categories.items()} == {k: v.size for k, v in parts.groups.items()}
    # The factory drew μ, σ in the masked space and sliced them per category: placement must undo that.
    assert torch.equal(spec.mean, torch.from_numpy(parts.mean_k))
    assert torch.equal(spec.std, torch.from_numpy(parts.std_k))


def test_folder_and_file_give_the_same_spec(tmp_path):
    parts = make_plain_run(seed=4)
    path = write_checkpoint(tmp_path / "ck", parts)
    by_folder, by_file = load_feature_spec(tmp_path / "ck"), load_feature_spec(path)
    assert by_folder.path == by_file.path == path
    assert torch.equal(by_folder.mean, by_file.mean)


def test_single_checkpoint_with_another_name_is_found(tmp_path):
    write_checkpoint(tmp_path / "ck", make_plain_run(seed=4), name="epoch_0042.pt")
    assert load_feature_spec(tmp_path / "ck").path.name == "epoch_0042.pt"


@pytest.mark.parametrize("space", ["kept", "original"])
def test_flat_stats_over_all_columns(tmp_path, space):
    parts = make_plain_run(seed=5)
    raw_mean, raw_std = parts.raw_stats()
    mean, std = (parts.mean_k, parts.std_k) if space == "kept" else (raw_mean, raw_std)

    def flat(ckpt):
        ckpt["normalization_stats"] = {"mean": mean, "std": std}

    spec = load_feature_spec(write_checkpoint(tmp_path, parts, edit=flat))
    assert torch.equal(spec.mean, torch.from_numpy(parts.mean_k))
    assert torch.equal(spec.std, torch.from_numpy(parts.std_k))


@pytest.mark.parametrize("kind", ["torch_bool", "uint8", "list"])
def test_mask_variants(tmp_path, kind):
    parts = make_plain_run(seed=6)
    convert = {"torch_bool": torch.from_numpy, "uint8": lambda m: m.astype(np.uint8), "list": lambda m: m.tolist()}

    def edit(ckpt):
        ckpt["feature_mask"] = convert[kind](parts.mask)

    spec = load_feature_spec(write_checkpoint(tmp_path, parts, edit=edit))
    assert spec.feature_mask.dtype == torch.bool and int(spec.feature_mask.sum()) == 171


def test_top_level_group_indices_of_older_trainers(tmp_path):
    parts = make_plain_run(seed=7)

    def edit(ckpt):
        ckpt["group_indices"] = ckpt["model_config"].pop("group_indices")

    spec = load_feature_spec(write_checkpoint(tmp_path, parts, edit=edit))
    assert torch.equal(spec.mean, torch.from_numpy(parts.mean_k))


def test_width_mismatch_names_the_numbers(tmp_path):
    path = write_checkpoint(tmp_path, make_plain_run(D=270, K=171, seed=9))
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(path, num_features=187)
    assert "270" in str(info.value) and "187" in str(info.value)


def test_no_stats_needed_for_norm_none(tmp_path):
    parts = make_plain_run(seed=10)
    path = write_checkpoint(tmp_path, parts, stats_in_file=False)
    with pytest.raises(CheckpointError, match="no normalization statistics"):
        load_feature_spec(path)
    spec = load_feature_spec(path, require_stats=False)
    assert spec.mean is None and spec.num_kept == 171
    loss = MaskedMSELoss.from_checkpoint(path, norm="none")
    assert isinstance(loss, MaskedMSELoss) and loss.norm == "none"


def test_loss_from_checkpoint_matches_the_plain_fix(tmp_path):
    parts = make_plain_run(method="mad", seed=11)
    path = write_checkpoint(tmp_path, parts, stats_in_file=False, stats_beside=True)
    loss_fn = MaskedMSELoss.from_checkpoint(path, num_features=187, reduction="sum")
    assert isinstance(loss_fn, MaskedMSELoss)

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(33, 187, generator=g) * 20).requires_grad_()
    r = torch.randn(33, 171, generator=g).requires_grad_()
    raw_mean, raw_std = (torch.from_numpy(a) for a in parts.raw_stats())
    mask = torch.from_numpy(parts.mask)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref = F.mse_loss(((x64 - raw_mean) / raw_std)[:, mask], r64, reduction="sum")
    (ref * 0.37).backward()

    got = loss_fn(x, r)
    (got * 0.37).backward()
    assert rel_err(got.detach(), ref.detach()) <= 1e-5
    assert rel_err(x.grad, x64.grad) <= 1e-5
    assert rel_err(r.grad, r64.grad) <= 1e-5
    assert float(x.grad[:, ~mask].abs().max()) == 0.0


# --- safety --------------------------------------------------------------------------------------


def _assert_refused(path, marker):
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "trust=True" in message and "pickled" in message
    assert not marker.exists(), "loading ran code stored in the file"
    # The whole pipeline refuses it the same way, as one sentence.
    problems = diagnose(path, 187)
    assert len(problems) == 1 and "trust=True" in problems[0]
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    parts = make_plain_run(seed=12)
    path = write_checkpoint(tmp_path, parts, edit=lambda ckpt: ckpt.update(config=Evil(marker)))
    _assert_refused(path, marker)
    # Positive control: the object really does act when fully unpickled, which trust=True allows (warning).
    with pytest.warns(UnsafeLoadWarning):
        read_checkpoint(path, trust=True)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_crafted_raw_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        pickle.dump({"feature_mask": Evil(marker)}, f, protocol=protocol)
    _assert_refused(path, marker)


def test_crafted_legacy_format_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"feature_mask": Evil(marker)}, path, _use_new_zipfile_serialization=False)
    _assert_refused(path, marker)


def test_crafted_stats_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    parts = make_plain_run(seed=13)
    path = write_checkpoint(tmp_path, parts, stats_in_file=False)
    evil = np.empty(1, dtype=object)
    evil[0] = Evil(marker)
    np.savez(tmp_path / "normalization_stats.npz", cluster_1_mean=evil, cluster_1_std=evil)
    problems = diagnose(path, 187)
    assert any("pickled objects" in p for p in problems)
    assert not marker.exists()


def test_trust_on_a_plain_file_warns_and_loads(tmp_path):
    path = write_checkpoint(tmp_path, make_plain_run(seed=14))
    with pytest.warns(UnsafeLoadWarning, match="arbitrary code"):
        spec = load_feature_spec(path, trust=True)
    assert spec.num_kept == 171


def test_bad_files_become_sentences(tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "could not be read" in diagnose(tmp_path / "text.pt")[0]
    assert "list" in diagnose(tmp_path / "list.pt")[0]
    assert "does not exist" in diagnose(tmp_path / "missing.pt")[0]
    assert "2 checkpoints" in diagnose(tmp_path)[0]


# --- the real statistics files -------------------------------------------------------------------


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the shared fixtures are not present")
@pytest.mark.parametrize("name", ["normalization_stats_adaptive_v3.npz", "normalization_stats_variance_tiered.npz"])
@pytest.mark.parametrize("placement", ["beside", "explicit"])
def test_real_stats_files(tmp_path, name, placement):
    fixture = FIXTURES / name
    with np.load(fixture, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    # A checkpoint whose categories are those of the real file, scattered over K kept columns of K + 16.
    categories, groups, mask, K = fixture_layout(arrays, 16)

    def edit(ckpt):
        ckpt["feature_mask"] = mask
        ckpt["model_config"].update(input_dim=K, group_indices={c: g.tolist() for c, g in groups.items()})

    path = write_checkpoint(tmp_path / "ck", make_plain_run(seed=15), stats_in_file=False, edit=edit)
    if placement == "beside":
        shutil.copy(fixture, tmp_path / "ck" / "normalization_stats.npz")  # a copy in the test's tmp folder
    spec = load_feature_spec(path, num_features=K + 16, stats=fixture if placement == "explicit" else None)

    assert spec.method == str(arrays["_normalization_method"][0]) == "standard"
    assert (spec.num_features, spec.num_kept) == (K + 16, K)
    for c in categories:
        assert torch.equal(spec.mean[groups[c]], torch.from_numpy(arrays[f"{c}_mean"].astype(np.float64)))
        assert torch.equal(spec.std[groups[c]], torch.from_numpy(arrays[f"{c}_std"].astype(np.float64)))

    loss_fn = MaskedMSELoss.from_checkpoint(path, stats=fixture if placement == "explicit" else None)
    x = torch.randn(5, K + 16, dtype=torch.float64) * 50
    r = torch.randn(5, K, dtype=torch.float64)
    held = spec.std.reciprocal().float().double()  # the module holds 1/σ in float32
    ref = F.mse_loss((x[:, torch.from_numpy(mask)] - spec.mean) * held, r)
    assert rel_err(loss_fn(x, r), ref) <= 1e-12
