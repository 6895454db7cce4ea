"""What the loaders say about a file: what it is and what to do when its format cannot be read, its names
escaped (they cannot drive the terminal) and shortened (a file chooses its names and how many there are: a
list is cut with "and N more", an error holds a bounded number of sentences, `fusedvq check` lists a bounded
number of categories), and the actual problem last in `fusedvq check`'s summary."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from ckpt_factory import checkpoint_dict, make_plain_run, write_checkpoint, write_npz
from hostile_files import as_checkpoint, global_, long_names
from fusedvq.checkpoint import CheckpointError, diagnose, load_feature_spec, read_checkpoint
from fusedvq.checkpoint.errors import MAX_PROBLEMS
from fusedvq.tools import cli


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    return long_names(tmp_path_factory.mktemp("ck") / "best_model.pt", names=6, length=50_000, strays=300)


def test_an_error_quotes_names_shortened_and_counts_the_rest(named):
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(named)
    text = str(info.value)
    assert len(text) < 20_000 and len(info.value.problems) == MAX_PROBLEMS
    assert "(50,001 characters)" in text and "n" * 100 not in text  # the declared names, shortened
    assert info.value.problems[-1] == f"... and {len(diagnose(named)) - MAX_PROBLEMS + 1:,} more problems"
    assert text.startswith(f"{named}: {len(diagnose(named))} problems:")


def test_check_prints_a_bounded_report(named):
    out, err = io.StringIO(), io.StringIO()
    assert cli.check(str(named), out=out, err=err) == 1
    assert len(out.getvalue()) + len(err.getvalue()) < 30_000
    assert "more problems" in err.getvalue()


def test_check_lists_a_bounded_number_of_categories(tmp_path):
    groups = {f"category_{i}_" + "x" * 100: [i] for i in range(100)}
    path = tmp_path / "normalization_stats.npz"
    np.savez(path, **{f"{name}_mean": np.zeros(1) for name in groups}, **{f"{name}_std": np.ones(1) for name in groups})
    out = io.StringIO()
    cli.check(str(path), out=out, err=io.StringIO())
    assert len(out.getvalue()) < 5_000 and "x" * 100 not in out.getvalue()


def test_exception_texts_hold_no_control_characters(tmp_path):
    data = checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2))
    groups = data["model_config"]["group_indices"]  # (its statistics stay under the old name)
    groups["\x1b]0;retitled\x07\x1b[2J\rok: consistent\u202e"] = groups.pop(next(iter(groups)))
    torch.save(data, tmp_path / "best_model.pt")
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(tmp_path / "best_model.pt")
    text = str(info.value)
    assert "retitled" in text and "\\x1b" in text
    assert not any(not ch.isprintable() for ch in text.replace("\n", "")), repr(text)


def test_unreadable_formats_say_what_the_file_is_and_what_to_do(tmp_path):
    data = {"feature_mask": torch.ones(3, dtype=torch.bool)}
    torch.save(data, tmp_path / "p4.pt", pickle_protocol=4)
    torch.save(data, tmp_path / "p1.pt", pickle_protocol=1, _use_new_zipfile_serialization=False)
    torch.save(data, tmp_path / "p0.pt", pickle_protocol=0, _use_new_zipfile_serialization=False)
    (tmp_path / "pickle").write_bytes(b"\x80\x02}q\x00.")
    with tarfile.open(tmp_path / "old.pt", "w") as archive:  # torch's oldest format: a tar of pickles
        for member in ("sys_info", "pickle", "storages", "tensors"):
            archive.add(tmp_path / "pickle", arcname=member)
    said = {"p4.pt": "protocol 4", "p1.pt": "protocol 1", "p0.pt": "protocol 0", "old.pt": "tar archive"}
    for name, what in said.items():
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(tmp_path / name)
        text = str(info.value)
        assert what in text and "re-save" in text and "Unsupported operand" not in text, text


def test_a_class_name_no_module_could_have_is_not_called_a_function(tmp_path):
    body = global_("trainer.records", "Re\u200bcord") + b")\x81"
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(as_checkpoint(tmp_path / "model.pt", body))
    assert "not a Python name" in str(info.value) and "function" not in str(info.value)


def test_check_escapes_control_characters(tmp_path, capsys):
    parts = make_plain_run(D=20, K=12, num_categories=2)
    evil = "\x1b]0;pwned\x07\x1b[2J"
    parts.groups = {evil + name: idx for name, idx in parts.groups.items()}
    write_checkpoint(tmp_path, parts)
    cli.main(["check", str(tmp_path), "--features", "21"])
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;pwned\\x07" in text


@pytest.mark.parametrize("case, words, not_words", [
    ("missing", "no checkpoint could be read", "does not fit"),
    ("empty folder", "no checkpoint could be read", "does not fit"),
    ("stats", "inconsistent", "does not fit a 20-column"),
])
def test_check_summary_names_the_actual_problem(tmp_path, capsys, case, words, not_words):
    if case == "missing":
        path = tmp_path / "nothing-here"
    elif case == "empty folder":
        path = tmp_path
    else:
        parts = make_plain_run(D=20, K=12, num_categories=2)
        write_checkpoint(tmp_path, parts, stats_in_file=False)
        path = tmp_path
        per_category = parts.per_category()
        first = next(iter(per_category))
        per_category[first] = {k: v[:-1] for k, v in per_category[first].items()}  # one entry short
        write_npz(path / "normalization_stats.npz", per_category)
    assert cli.main(["check", str(path), "--features", "20"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert words in last and not_words not in last, last
