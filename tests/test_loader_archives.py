"""Zip archives whose directory is the attack: a directory of hundreds of thousands of members is refused
from the end record before it is parsed (in the caller, where no bound applies), and two members of one
name are refused (the scan and torch's reader would read different bytes). (A checkpoint of 70,000 members:
test_loader_hostile.py, timed.)"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from hostile_files import _checkpoint_members, many_arrays, raw_zip, two_data_records
from fusedvq.checkpoint import CheckpointError, declare, read_checkpoint


def test_a_statistics_file_of_too_many_members_is_refused_unparsed(tmp_path):
    path = many_arrays(tmp_path / "normalization_stats.npz", members=5_000)
    decl = declare(path)
    assert any("zip directory of 5,002 members" in p for p in decl.problems), decl.problems


def test_many_members_is_not_a_statistics_file(tmp_path):
    """A file named without .npz whose members are all arrays is a statistics file, but the caller parses only
    a directory of a statistics file's size to tell: a longer one is read as a checkpoint, in the child."""
    path = many_arrays(tmp_path / "arrays.bin", members=5_000)
    decl = declare(path)
    assert not decl.stats_only and any("could not be read as a PyTorch checkpoint" in p for p in decl.problems)


def test_two_members_of_one_name_are_refused(tmp_path):
    path = two_data_records(tmp_path / "two.pt")
    with zipfile.ZipFile(path) as archive:  # (what the scan would read: the plain one)
        assert b"punycode" not in archive.read("archive/data.pkl")
    with pytest.raises(CheckpointError, match=r"holds 2 members named 'archive/data.pkl'"):
        read_checkpoint(path)


def test_two_arrays_of_one_name_are_refused(tmp_path):
    buffers = []
    for value in (0.0, 1.0):
        buffer = io.BytesIO()
        np.save(buffer, np.full(3, value))
        buffers.append(buffer.getvalue())
    path = raw_zip(tmp_path / "normalization_stats.npz",
                   [("c_mean.npy", buffers[0]), ("c_std.npy", buffers[1]), ("c_std.npy", buffers[0])])
    decl = declare(path)
    assert any("holds 2 members named 'c_std.npy'" in p for p in decl.problems), decl.problems


def test_an_honest_zip_written_field_by_field_still_loads(tmp_path):
    """raw_zip itself writes what torch reads (the refusals above are the archives', not the writer's)."""
    data = {"feature_mask": torch.ones(4, dtype=torch.bool), "model_config": {"input_dim": 4}}
    path = raw_zip(tmp_path / "plain.pt", _checkpoint_members(data))
    assert torch.equal(read_checkpoint(path)["feature_mask"], data["feature_mask"])
