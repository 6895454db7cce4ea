"""`fusedvq check`: what it prints, every diagnosis (with its numbers), exit codes, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import Evil, make_plain_run, write_checkpoint, write_npz

from fusedvq.tools.cli import main

REPO = Path(__file__).resolve().parents[1]
SIZES = [11, 21, 22, 3, 30, 28, 26, 30]  # the categories' sizes (171 kept columns), named in the messages


def sized_parts(**kw):
    return make_plain_run(sizes=SIZES, **kw)


def run_check(capsys, *argv) -> tuple[int, str, str]:
    code = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_consistent_checkpoint(tmp_path, capsys):
    parts = sized_parts(seed=1)
    path = write_checkpoint(tmp_path, parts)
    code, out, err = run_check(capsys, path, "--features", 187)
    assert code == 0 and err == ""
    assert "187 original feature columns, 171 kept (16 dropped)" in out
    assert "input_dim 171" in out
    assert "8, listing 171 kept columns" in out
    for name, idx in parts.groups.items():
        assert any(line.split() == [name, str(idx.size), "columns"] for line in out.splitlines())
    assert "standard (mean/std) per category" in out
    assert "ok: consistent" in out


def test_mad_stats_beside_folder(tmp_path, capsys):
    write_checkpoint(tmp_path, sized_parts(method="mad", seed=2), stats_in_file=False, stats_beside=True)
    code, out, _ = run_check(capsys, tmp_path)
    assert code == 0
    assert "mad (median/mad) per category, from normalization_stats.npz beside the checkpoint" in out


def _drop_stats_category(ckpt):
    del ckpt["normalization_stats"]["cluster_3"]


def _edit_group(name, fn):
    def edit(ckpt):
        groups = ckpt["model_config"]["group_indices"]
        groups[name] = fn(groups)

    return edit


def _set_stat(name, key, fn):
    def edit(ckpt):
        entry = ckpt["normalization_stats"][name]
        entry[key] = fn(entry[key].copy())

    return edit


def _first_of(name):
    return lambda groups: groups[name]


def _pop(ckpt, *keys):
    target = ckpt
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]


# (edit, --features, substrings the problem sentences must contain); category sizes from SIZES.
CASES = {
    "mask length vs extractor": (None, 270, ["feature_mask has 187 entries", "extractor gives 270 columns"]),
    "kept vs input_dim": (
        lambda c: c["model_config"].update(input_dim=170), 187,
        ["keeps 171 of 187 columns", "input_dim is 170"],
    ),
    "group out of range": (
        _edit_group("cluster_1", lambda g: g["cluster_1"] + [171]), None,
        ["column index 171, outside the 171 kept columns", "valid: 0..170"],
    ),
    "negative group index": (
        _edit_group("cluster_1", lambda g: g["cluster_1"] + [-1]), None, ["column index -1, outside"],
    ),
    "overlap": (
        _edit_group("cluster_2", lambda g: g["cluster_2"] + g["cluster_3"][:2]), None,
        ["'cluster_2' and 'cluster_3' overlap: both claim 2 kept columns"],
    ),
    "duplicate within a category": (
        _edit_group("cluster_4", lambda g: g["cluster_4"] + g["cluster_4"][:1]), None,
        ["'cluster_4' lists 1 kept column more than once"],
    ),
    "not covering": (
        _edit_group("cluster_2", lambda g: g["cluster_2"][1:]), None,
        ["the categories cover 170 of the 171 kept columns; 1 column is in no category"],
    ),
    "stats length": (
        _set_stat("cluster_2", "mean", lambda a: a[:-1]), None,
        ["mean for category 'cluster_2' has 20 entries but the category covers 21 columns"],
    ),
    "std zero": (
        _set_stat("cluster_3", "std", lambda a: np.concatenate([a[:4], [0.0], a[5:]])), None,
        ["std for category 'cluster_3' is 0.0 at entry 4", "finite and > 0", "1 of 22 entries bad"],
    ),
    "std negative": (
        _set_stat("cluster_3", "std", lambda a: -a), None, ["std for category 'cluster_3' is -", "22 of 22"],
    ),
    "std not finite": (
        _set_stat("cluster_1", "std", lambda a: np.concatenate([[np.inf], a[1:]])), None,
        ["std for category 'cluster_1' is inf at entry 0"],
    ),
    "mean not finite": (
        _set_stat("cluster_1", "mean", lambda a: np.concatenate([a[:2], [np.nan], a[3:]])), None,
        ["mean for category 'cluster_1' is nan at entry 2"],
    ),
    "stats miss a category": (_drop_stats_category, None, ["no statistics for category 'cluster_3' (22 columns)"]),
    "stats for an undeclared category": (
        lambda c: c["normalization_stats"].update(extra={"mean": np.zeros(2), "std": np.ones(2)}), None,
        ["statistics for category 'extra', which group_indices does not declare"],
    ),
    "half a pair": (lambda c: c["normalization_stats"]["cluster_1"].pop("std"), None, ["have mean but no std"]),
    "missing feature_mask": (lambda c: _pop(c, "feature_mask"), None, ["no feature_mask"]),
    "missing model_config": (lambda c: _pop(c, "model_config"), None, ["no model_config", "no group_indices"]),
    "missing input_dim": (lambda c: _pop(c, "model_config", "input_dim"), None, ["no input_dim"]),
    "missing group_indices": (lambda c: _pop(c, "model_config", "group_indices"), None, ["no group_indices"]),
    "missing stats": (lambda c: _pop(c, "normalization_stats"), None, ["no normalization statistics"]),
    "mask not boolean": (
        lambda c: c.update(feature_mask=c["feature_mask"].astype(np.float32)), None, ["boolean", "float32"],
    ),
    "mask not 1-D": (
        lambda c: c.update(feature_mask=np.ones((11, 17), dtype=bool)), None, ["1-D", "(11, 17)"],
    ),
    "input_dim not a number": (
        lambda c: c["model_config"].update(input_dim="171"), None, ["'171'", "not a positive integer"],
    ),
    "non-integer group indices": (
        _edit_group("cluster_1", lambda g: [i + 0.5 for i in g["cluster_1"]]), None, ["non-integer"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_diagnosis(tmp_path, capsys, case):
    edit, features, expected = CASES[case]
    path = write_checkpoint(tmp_path, sized_parts(seed=1), edit=edit)
    argv = [path] + (["--features", features] if features else [])
    code, out, err = run_check(capsys, *argv)
    assert code == 1
    assert "ok:" not in out
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors, err
    for text in expected:
        assert any(text in line for line in errors), f"{text!r} not in:\n{err}"
    assert err.splitlines()[-1].startswith(f"{len(errors)} problem")
    assert "checkpoint " in out  # the declared facts are printed even when something is wrong


def test_stats_file_problems(tmp_path, capsys):
    parts = sized_parts(seed=1)
    path = write_checkpoint(tmp_path, parts, stats_in_file=False)
    (tmp_path / "normalization_stats.npz").write_bytes(b"garbage")
    code, _, err = run_check(capsys, path)
    assert code == 1 and "normalization_stats.npz could not be read" in err

    (tmp_path / "normalization_stats.npz").unlink()
    for name in ("normalization_stats_a.npz", "normalization_stats_b.npz"):
        write_npz(tmp_path / name, parts.per_category())
    code, _, err = run_check(capsys, path)
    assert code == 1 and "2 statistics files" in err
    code, out, _ = run_check(capsys, path, "--stats", tmp_path / "normalization_stats_a.npz")
    assert code == 0 and "from normalization_stats_a.npz" in out

    per_category = parts.per_category()
    per_category["cluster_4"]["std"] = per_category["cluster_4"]["std"][:2]
    write_npz(tmp_path / "short.npz", per_category)
    code, _, err = run_check(capsys, path, "--stats", tmp_path / "short.npz")
    assert code == 1 and "std for category 'cluster_4' has 2 entries but the category covers 3 columns" in err


def test_norm_without_stats(tmp_path, capsys):
    path = write_checkpoint(tmp_path, sized_parts(seed=1), stats_in_file=False)
    assert run_check(capsys, path)[0] == 1
    code, out, _ = run_check(capsys, path, "--norm", "none", "--features", 187)
    assert code == 0 and "--norm none needs no statistics" in out


def test_disagreeing_stats_and_choosing_one(tmp_path, capsys):
    parts = sized_parts(seed=1)
    path = write_checkpoint(tmp_path, parts)
    other = parts.per_category()
    other["cluster_1"]["std"] = other["cluster_1"]["std"] * 2
    write_npz(tmp_path / "normalization_stats.npz", other)
    code, out, _ = run_check(capsys, path)  # the checkpoint's own are used; the file is noted, not used
    assert code == 0 and "note:" in out and "disagrees with the checkpoint's own: std of kept column" in out
    code, out, _ = run_check(capsys, path, "--stats", "checkpoint")
    assert code == 0 and "note:" not in out


def test_unreadable_files(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("hello")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    for path, text in [
        (tmp_path / "text.pt", "could not be read as a PyTorch checkpoint"),
        (tmp_path / "list.pt", "holds a list"),
        (tmp_path / "nothing.pt", "does not exist"),
        (tmp_path / "empty", "holds no checkpoint"),
    ]:
        if path.name == "empty":
            path.mkdir()
        code, out, err = run_check(capsys, path)
        assert code == 1 and text in err


def test_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = write_checkpoint(tmp_path, sized_parts(seed=1), edit=lambda c: c.update(feature_names=Evil(marker)))
    code, _, err = run_check(capsys, path)
    assert code == 1 and "--trust" in err and "pickled" in err
    assert not marker.exists()


def test_trust_warns(tmp_path, capsys):
    path = write_checkpoint(tmp_path, sized_parts(seed=1))
    code, out, err = run_check(capsys, path, "--trust")
    assert code == 0 and "warning:" in err and "arbitrary code" in err


def test_bad_usage(capsys):
    assert main(["check", "x.pt", "--features", "0"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2


def test_plain_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "check" in out and "demo" in out and "bench" in out


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_command_line_never_shows_a_traceback(tmp_path, warm_python):
    """The real entry point (python -m fusedvq, run by conftest's warm python) on a bad file, a crafted file
    and a good one."""
    marker = tmp_path / "pwned"
    bad = write_checkpoint(tmp_path / "bad", make_plain_run(D=270, seed=1),
                           edit=lambda c: c["model_config"].update(input_dim=170))
    evil = write_checkpoint(tmp_path / "evil", sized_parts(seed=1), edit=lambda c: c.update(config=Evil(marker)))
    good = write_checkpoint(tmp_path / "good", sized_parts(seed=1))
    script = (
        "import sys\nfrom fusedvq.tools.cli import main\n"
        "codes = [main(['check', p] + (['--features', '187'])) for p in sys.argv[1:]]\n"
        "print('codes', codes)\n"
    )
    proc = subprocess.run([str(warm_python), "-c", script, str(bad), str(evil), str(good)], capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "codes [1, 1, 0]" in proc.stdout
    assert "feature_mask has 270 entries" in proc.stderr and "input_dim is 170" in proc.stderr
    assert not marker.exists()

    proc = subprocess.run([str(warm_python), "-m", "fusedvq", "check", str(bad), "--features", "187"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "270" in proc.stderr and "187" in proc.stderr


def test_bench_is_dispatched_lazily(monkeypatch, capsys):
    """`fusedvq bench …` hands its arguments to fusedvq.tools.benchmark (stubbed here), imported only then."""
    import types

    import fusedvq.tools

    seen = {}
    stub = types.ModuleType("fusedvq.tools.benchmark")
    stub.add_arguments = lambda parser: parser.add_argument("--size", type=int, default=1)
    stub.run = lambda args: seen.setdefault("size", args.size) and 0
    monkeypatch.setitem(sys.modules, "fusedvq.tools.benchmark", stub)
    monkeypatch.setattr(fusedvq.tools, "benchmark", stub, raising=False)
    assert main(["bench", "--size", "7"]) == 0
    assert seen == {"size": 7}
