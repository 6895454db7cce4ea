"""Checkpoints as the motivating project writes them (ckpt_factory.make_run): read by default without its
package and without running anything, statistics on the columns its own normalization puts them on,
statistics files usable on their own, and crafted pickles inert. (Its hybrid layouts: test_hybrid_layout.py.)"""

from __future__ import annotations

import pickle
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ckpt_factory import (NormalizationStats, checkpoint_dict, fixture_layout, make_run, shared_dir, trainer_classes,
                          write_checkpoint, write_npz)

from fusedvq import VQReconLoss
from fusedvq.checkpoint import CheckpointError, load_feature_spec, read_checkpoint
from helpers import run_check
from oracle import rel_err

FIXTURES = shared_dir() / "fixtures" / "spinlock"
RUNS = [pytest.param(h, m, id=f"{'hybrid' if h else 'plain'}-{m}") for h in (False, True) for m in ("standard", "mad")]


# --- reading, by default, without the trainer's package ------------------------------------------


@pytest.mark.parametrize("hybrid, method", RUNS)
@pytest.mark.parametrize("source", ["checkpoint", "npz"])
def test_statistics_land_where_the_trainer_puts_them(tmp_path, hybrid, method, source):
    run = make_run(hybrid=hybrid, method=method, seed=1 + hybrid)
    path = write_checkpoint(tmp_path, run)
    assert not any(m == "spinlock" or m.startswith("spinlock.") for m in sys.modules)
    spec = load_feature_spec(path, num_features=270, stats="checkpoint" if source == "checkpoint" else
                             tmp_path / "normalization_stats.npz")
    mu, sigma = run.mean_k.astype(np.float32), run.std_k.astype(np.float32)
    # Bitwise: float64 of the stored float32 value, on the very column the trainer normalizes with it.
    assert np.array_equal(spec.mean.numpy(), mu.astype(np.float64))
    assert np.array_equal(spec.std.numpy(), sigma.astype(np.float64))
    assert spec.method == method and spec.num_kept == run.K and spec.num_features == 270
    assert not any(m == "spinlock" or m.startswith("spinlock.") for m in sys.modules)


def test_foreign_objects_become_records_and_paths_strings(tmp_path):
    path = write_checkpoint(tmp_path, make_run(hybrid=True, seed=3))
    data = read_checkpoint(path)
    stats = data["normalization_stats"]["cluster_1"]
    assert type(stats).__name__ == "NormalizationStats" and not isinstance(stats, NormalizationStats)
    assert stats.class_name == "spinlock.encoding.normalization.NormalizationStats"
    assert sorted(stats.attributes) == ["mean", "std"] and stats.attributes["mean"].dtype == np.float32
    assert data["config"]["output_dir"] == "/runs/vqvae/v1"  # a PosixPath, as its string
    assert isinstance(data["metrics"]["val_loss"], np.float32)
    from fusedvq.checkpoint.records import ForeignCallRefused

    with pytest.raises(ForeignCallRefused):
        type(stats)(1, 2)  # a stand-in class cannot be called (constructed) at all


def test_trust_still_needs_the_package(tmp_path):
    path = write_checkpoint(tmp_path, make_run(hybrid=False, seed=4))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="'spinlock', which is not installed"):
        read_checkpoint(path, trust=True)
    with trainer_classes(), pytest.warns(UserWarning):
        real = read_checkpoint(path, trust=True)["normalization_stats"]["cluster_1"]
        assert isinstance(real, NormalizationStats)


# --- statistics files on their own ---------------------------------------------------------------


def test_check_says_what_a_statistics_file_holds(tmp_path):
    run = make_run(hybrid=False, method="mad", seed=13)
    npz = write_npz(tmp_path / "normalization_stats.npz", run.per_category(), run.method)
    rc, out, err = run_check(str(npz))
    assert rc == 1 and "Traceback" not in err and "enforce" not in err
    assert "statistics file" in out and "6 categories" in out and f"{run.K} columns" in out and "mad" in out
    assert "no feature_mask" in err and "group_indices" in err and "load_feature_spec(stats=" in err
    rc, out, err = run_check(str(tmp_path))  # a folder holding only the statistics file
    assert rc == 1 and "holds no checkpoint" in err and "only the statistics file normalization_stats.npz" in err
    assert "no statistics found" not in out and "6 categories" in out
    with pytest.raises(CheckpointError, match="is a statistics file"):
        load_feature_spec(npz)


def test_spec_from_a_mask_groups_and_a_statistics_file(tmp_path):
    run = make_run(hybrid=False, seed=14)
    npz = write_npz(tmp_path / "stats.npz", run.per_category(), run.method)
    groups = {n: g.tolist() for n, g in run.groups.items()}
    spec = load_feature_spec(stats=npz, feature_mask=run.mask, group_indices=groups, num_features=270)
    mu, sigma = run.mean_k.astype(np.float32), run.std_k.astype(np.float32)
    assert np.array_equal(spec.mean.numpy(), mu.astype(np.float64))
    assert np.array_equal(spec.std.numpy(), sigma.astype(np.float64))
    loss = VQReconLoss.from_spec(spec)
    x, r = torch.randn(3, 270), torch.randn(3, run.K)
    ref = F.mse_loss((x.double()[:, run.mask] - torch.from_numpy(mu).double()) / torch.from_numpy(sigma).double(),
                     r.double())
    assert rel_err(loss(x, r).detach(), ref) <= 1e-5
    with pytest.raises(CheckpointError, match="no group_indices"):
        load_feature_spec(stats=npz, feature_mask=run.mask)
    with pytest.raises(CheckpointError, match="category 'cluster_1'"):
        short = {**groups, "cluster_1": groups["cluster_1"][:-1]}
        load_feature_spec(stats=npz, feature_mask=run.mask, group_indices=short)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="the shared fixtures are not present")
@pytest.mark.parametrize("name", ["normalization_stats_adaptive_v3.npz", "normalization_stats_variance_tiered.npz"])
def test_real_statistics_files_on_their_own(tmp_path, name):
    fixture = FIXTURES / name
    rc, out, err = run_check(str(fixture))
    assert rc == 1 and "statistics file" in out and "Traceback" not in err and "enforce" not in err
    with np.load(fixture, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    cats, groups, mask, K = fixture_layout(arrays, 9)
    spec = load_feature_spec(stats=fixture, feature_mask=mask, group_indices=groups)
    for c in cats:
        assert np.array_equal(spec.mean.numpy()[groups[c]], arrays[f"{c}_mean"].astype(np.float64))
        assert np.array_equal(spec.std.numpy()[groups[c]], arrays[f"{c}_std"].astype(np.float64))
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(fixture, copy / "normalization_stats.npz")
    rc, out, err = run_check(str(copy))
    assert rc == 1 and f"{len(cats)} categories" in out


# --- crafted pickles stay inert ------------------------------------------------------------------


class Call:
    """Pickles as a call of `fn(*args)`; callable itself, so that calls can be chained (fn = another Call)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)

    def __call__(self, *args):  # pragma: no cover - only pickled
        raise AssertionError


def _attacks(marker):
    import builtins
    import copyreg
    import os
    import pathlib
    import subprocess

    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Call(os.system, f"touch {marker}"), "system"),
        "eval": (Call(builtins.eval, touch), "eval"),
        "exec": (Call(builtins.exec, touch), "exec"),
        # (pickle protocol 2 writes subprocess's functions under their Python 2 module, commands)
        "subprocess.call": (Call(subprocess.call, ["touch", str(marker)]), ("subprocess.call", "commands.call")),
        "subprocess.Popen": (Call(subprocess.Popen, ["touch", str(marker)]), ("subprocess.Popen", "commands.Popen")),
        "getattr chain": (Call(Call(builtins.getattr, pathlib.Path(marker), "touch")), "getattr"),
        "copyreg": (Call(copyreg._reconstructor, pathlib.PosixPath, object, None),
                    ("copyreg._reconstructor", "copy_reg._reconstructor")),
        "inside a record": (NormalizationStats(Call(os.system, f"touch {marker}"), np.ones(2)), "system"),
    }


ATTACKS = ["os.system", "eval", "exec", "subprocess.call", "subprocess.Popen", "getattr chain", "copyreg",
           "inside a record"]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("container", ["torch.save", "pickle-2", "pickle-4"])
def test_crafted_pickles_run_nothing(tmp_path, attack, container):
    marker = tmp_path / "pwned"
    payload, named = _attacks(marker)[attack]
    named = (named,) if isinstance(named, str) else named
    run = make_run(hybrid=True, seed=15)
    path = write_checkpoint(tmp_path, run, stats_beside=False,
                            edit=lambda ck: ck["normalization_stats"].update(cluster_1=payload))
    if container != "torch.save":
        data = checkpoint_dict(run)
        data["normalization_stats"]["cluster_1"] = payload
        with trainer_classes(), open(path, "wb") as f:
            pickle.dump(data, f, protocol=int(container[-1]))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert any(n in str(info.value) for n in named) and "trust=True" in str(info.value)
    rc, out, err = run_check(str(path))
    assert rc == 1 and "Traceback" not in err and any(n in err for n in named)
    assert not marker.exists(), "loading ran code stored in the file"


def test_calling_a_stand_in_class_is_refused(tmp_path):
    run = make_run(hybrid=False, seed=16)
    call = Call(NormalizationStats, np.zeros(2), np.ones(2))  # a REDUCE on the trainer's class
    path = write_checkpoint(tmp_path, run, stats_beside=False,
                            edit=lambda ck: ck["normalization_stats"].update(cluster_1=call))
    with pytest.raises(CheckpointError, match=r"calls spinlock\.encoding\.normalization\.NormalizationStats\(\.\.\.\)"):
        read_checkpoint(path)


def test_the_readme_minimal_checkpoint_is_valid(tmp_path, monkeypatch):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("A minimal valid checkpoint")
    begin = text.index("```python\n", start) + len("```python\n")
    code = text[begin : text.index("```", begin)]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    rc, out, err = run_check(str(tmp_path / "best_model.pt"), features=187)
    assert rc == 0, err
    spec = load_feature_spec(tmp_path / "best_model.pt", num_features=187)
    assert spec.num_kept == 171 and float(spec.std.min()) == 1.0


# --- files built to exhaust the reader ------------------------------------------------------------


def test_an_exponential_tuple_is_refused_before_it_is_built(tmp_path):
    body = b")q\x00" + b"".join(b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(40))  # t = (t, t)
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02}(" + body + b"K\x01u.")  # {t_40: 1}: hashing t_40 would never end
    with pytest.raises(CheckpointError, match="tuple of"):
        read_checkpoint(path)


class SelfKeyed:
    """A record whose state is keyed by the record itself."""

    def __reduce__(self):
        import copyreg

        return (copyreg.__newobj__, (type(self),), {self: 1})


def test_records_keyed_by_themselves_and_other_oddities_become_sentences(tmp_path):
    run = make_run(hybrid=True, seed=19)
    big = torch.zeros(1).expand(300_000_000)  # stride 0: 4 bytes stored, 300M entries declared
    cases = {
        "neither mean/std nor median/mad": lambda ck: ck["normalization_stats"].update(cluster_1=SelfKeyed()),
        "300,000,000 entries": lambda ck: ck["normalization_stats"].update(cluster_2={"mean": big, "std": big}),
        "hybrid VQ-VAE": lambda ck: ck["config"]["families"]["initial"].update(encoder=np.array(["a", "b"])),
        "ok: consistent": lambda ck: ck["model_state_dict"].update({("initial_encoder.x", 1): torch.zeros(1)}),
    }
    for i, (said, edit) in enumerate(cases.items()):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        ckpt = checkpoint_dict(run)
        edit(ckpt)
        with trainer_classes(SelfKeyed=SelfKeyed):
            torch.save(ckpt, folder / "best_model.pt")
        rc, out, err = run_check(str(folder))
        assert "could not be checked" not in err and "Traceback" not in err
        assert said in out + err, (said, err)


def test_a_bytearray_of_stated_size_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"feature_mask": np.ones(3, bool), "blob": bytearray(16)}, path)
    with pytest.raises(CheckpointError, match="bytearray"):
        read_checkpoint(path)


def test_an_inference_mode_call_does_not_poison_later_training(tmp_path):
    from fusedvq.loss import MaskedMSELoss

    loss_fn = MaskedMSELoss(torch.arange(5), num_features=7, norm="none", target_gap=(2, 3))
    with torch.inference_mode():
        loss_fn(torch.randn(4, 7), torch.randn(4, 8))
    x = torch.randn(4, 7, requires_grad=True)
    loss_fn(x, torch.randn(4, 8)).backward()
    assert x.grad is not None


def test_an_empty_method_marker_is_no_method(tmp_path):
    npz = tmp_path / "s.npz"
    np.savez(npz, a_mean=np.zeros(2), a_std=np.ones(2), _normalization_method=np.array([], dtype="U1"))
    spec = load_feature_spec(stats=npz, feature_mask=np.ones(2, bool), group_indices={"a": [0, 1]})
    assert spec.method == "standard"
