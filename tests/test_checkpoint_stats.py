"""Where a checkpoint's statistics come from: its own normalization_stats win over a statistics file beside
it (in its folder or the run folder above), whatever that file holds, with one StatsNotUsedWarning and a note
from `fusedvq check` (no note where they agree); a source chosen settles it; a statistics file that holds no
statistics is said to, once; a real statistics file given to `fusedvq check`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ckpt_factory import make_plain_run, shared_dir, write_checkpoint, write_npz

from fusedvq import MaskedMSELoss
from fusedvq.checkpoint import CheckpointError, StatsNotUsedWarning, load_feature_spec
from helpers import run_check


def test_stats_in_file_win_over_a_disagreeing_file_beside(tmp_path):
    parts = make_plain_run(seed=8)
    path = write_checkpoint(tmp_path, parts, stats_beside=True)
    assert load_feature_spec(path).stats_source == "the checkpoint's normalization_stats"  # same numbers: fine

    shifted = parts.per_category()
    shifted["cluster_2"]["mean"] = shifted["cluster_2"]["mean"] + 1.0
    write_npz(tmp_path / "normalization_stats.npz", shifted)
    with pytest.warns(StatsNotUsedWarning, match="disagrees"):
        assert torch.equal(load_feature_spec(path).mean, torch.from_numpy(parts.mean_k))
    # Choosing a source settles it.
    assert torch.equal(load_feature_spec(path, stats="checkpoint").mean, torch.from_numpy(parts.mean_k))
    assert not torch.equal(load_feature_spec(path, stats=tmp_path / "normalization_stats.npz").mean,
                           torch.from_numpy(parts.mean_k))


@pytest.mark.parametrize("where", ["folder above", "same folder"])
@pytest.mark.parametrize("unrelated", ["other categories", "other numbers", "no statistics"])
def test_own_statistics_win_over_a_statistics_file_beside(tmp_path, where, unrelated):
    parts = make_plain_run(seed=31)
    path = write_checkpoint(tmp_path / "run" / "ck", parts)
    npz = (tmp_path / "run" if where == "folder above" else tmp_path / "run" / "ck") / "normalization_stats.npz"
    if unrelated == "other categories":
        write_npz(npz, make_plain_run(D=50, K=40, num_categories=3, seed=32).per_category())
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
    parts = make_plain_run(seed=33)
    path = write_checkpoint(tmp_path, parts, stats_beside=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_feature_spec(path)
    rc, out, _ = run_check(path)
    assert rc == 0 and "note:" not in out


def _no_stats_npz(path):
    np.savez(path, batch_83_params=np.arange(4.0), batch_84_params=np.arange(4.0))
    return path


def test_an_npz_without_statistics_is_said_once(tmp_path):
    npz = _no_stats_npz(tmp_path / "batch.npz")
    rc, out, err = run_check(npz)
    text = out + err
    assert rc == 1 and "0 categories" not in text and "statistics file batch.npz" not in text
    assert text.count("no statistics") == 1 and "batch_83_params" in text

    path = write_checkpoint(tmp_path / "ck", make_plain_run(seed=1), stats_in_file=False)
    rc, out, err = run_check(path, stats=npz)
    assert rc == 1 and "for category" not in err and err.count("no statistics") == 1
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(path, stats=npz)
    assert len(info.value.problems) == 1 and "holds no statistics" in str(info.value)
    parts = make_plain_run(seed=1)
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(feature_mask=parts.mask, group_indices=parts.groups, stats=npz)
    assert len(info.value.problems) == 1 and "holds no statistics" in str(info.value)


@pytest.mark.skipif(not (shared_dir() / "fixtures" / "spinlock").is_dir(), reason="the shared fixtures are not present")
def test_check_with_a_real_stats_file(tmp_path):
    fixture = shared_dir() / "fixtures" / "spinlock" / "normalization_stats_adaptive_v3.npz"
    with np.load(fixture, allow_pickle=False) as npz:
        sizes = {k[: -len("_mean")]: npz[k].size for k in npz.files if k.endswith("_mean")}
    K, start, groups = sum(sizes.values()), 0, {}
    for name, n in sizes.items():
        groups[name] = list(range(start, start + n))
        start += n
    mask = np.zeros(K + 20, dtype=bool)
    mask[:K] = True

    def edit(ckpt):
        ckpt["feature_mask"] = mask
        ckpt["model_config"].update(input_dim=K, group_indices=groups)

    path = write_checkpoint(tmp_path, make_plain_run(seed=1), stats_in_file=False, edit=edit)
    code, out, _ = run_check(path, features=K + 20, stats=str(fixture))
    assert code == 0
    assert f"{K + 20} original feature columns, {K} kept" in out and "standard (mean/std)" in out
