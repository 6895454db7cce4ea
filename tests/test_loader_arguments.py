"""The loaders' own arguments mean exactly what they say: a boolean option takes True or False (or a numpy
bool), a count a positive int, a path a str or os.PathLike; anything else is a TypeError naming the argument
and the value, before any file is read (so trust="False" never unpickles fully)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from ckpt_factory import Evil, make_plain_run, write_checkpoint
from fusedvq.checkpoint import (
    CheckpointError, declare, declare_parts, diagnose, find_problems, load_feature_spec, read_checkpoint,
    read_stats_file,
)
from fusedvq.tools import cli

NOT_BOOLEANS = ["False", "no", "", 0, 1, None, 1.0, [True], torch.tensor(False), np.array([True])]
NOT_COUNTS = ["10", True, np.bool_(True), 10.0, np.float64(10), torch.tensor(10), [10]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck"), make_plain_run(D=20, K=12, num_categories=2))


@pytest.mark.parametrize("value", ["False", "no", 0], ids=repr)
def test_trust_as_a_string_never_unpickles_fully(tmp_path, value):
    marker = tmp_path / "ran"
    path = tmp_path / "best_model.pt"
    torch.save({"feature_mask": np.ones(3, bool), "payload": Evil(marker)}, path)
    with pytest.raises(TypeError, match=rf"trust must be True or False, got \w+ {value!r}"):
        load_feature_spec(path, trust=value)
    for call in (lambda: diagnose(path, trust=value), lambda: read_checkpoint(path, trust=value),
                 lambda: declare(path, trust=value), lambda: cli.check(str(path), trust=value, out=io.StringIO(),
                                                                       err=io.StringIO())):
        with pytest.raises(TypeError, match="trust must be True or False"):
            call()
    assert not marker.exists()


@pytest.mark.parametrize("value", NOT_BOOLEANS, ids=repr)
def test_boolean_options_refuse_everything_but_booleans(checkpoint, value):
    with pytest.raises(TypeError, match="trust must be True or False"):
        load_feature_spec(checkpoint, trust=value)
    with pytest.raises(TypeError, match="require_stats must be True or False"):
        load_feature_spec(checkpoint, require_stats=value)
    with pytest.raises(TypeError, match="need_stats must be True or False"):
        diagnose(checkpoint, need_stats=value)
    with pytest.raises(TypeError, match="need_stats must be True or False"):
        find_problems(declare(checkpoint), need_stats=value)
    with pytest.raises(TypeError, match="need_stats must be True or False"):
        declare_parts(np.ones(3, bool), need_stats=value)


def test_numpy_booleans_are_booleans(checkpoint):
    spec = load_feature_spec(checkpoint, trust=np.False_, require_stats=np.bool_(False))
    assert spec.mean is None and spec.num_features == 20
    assert diagnose(checkpoint, trust=np.False_, need_stats=np.True_) == []


@pytest.mark.parametrize("value", NOT_COUNTS, ids=repr)
def test_num_features_is_a_real_int(checkpoint, value):
    for call in (lambda: load_feature_spec(checkpoint, num_features=value), lambda: diagnose(checkpoint, value),
                 lambda: find_problems(declare(checkpoint), value)):
        with pytest.raises(TypeError, match="num_features must be an int"):
            call()
    with pytest.raises(TypeError, match="features must be an int"):
        cli.check(str(checkpoint), features=value, out=io.StringIO(), err=io.StringIO())


def test_num_features_as_a_numpy_int_and_zero(checkpoint):
    assert load_feature_spec(checkpoint, num_features=np.int64(20)).num_features == 20
    with pytest.raises(ValueError, match="num_features must be a positive int .* got 0"):
        load_feature_spec(checkpoint, num_features=0)


@pytest.mark.parametrize("value", [3, b"best_model.pt", 2.5, ["best_model.pt"]], ids=repr)
def test_a_path_of_the_wrong_kind_names_the_argument(value):
    for call in (load_feature_spec, diagnose, read_checkpoint, declare):
        with pytest.raises(TypeError, match="path must be the path of a checkpoint file or folder"):
            call(value)
    with pytest.raises(TypeError, match="path must be the path of a statistics .npz"):
        read_stats_file(value)


def test_stats_of_the_wrong_kind_beside_a_path(checkpoint):
    with pytest.raises(TypeError, match="stats must be the path of a statistics .npz"):
        load_feature_spec(checkpoint, stats=3)


def test_one_problem_given_as_a_string_is_one_problem():
    err = CheckpointError("one problem")
    assert err.problems == ["one problem"] and str(err) == "one problem"
    assert str(CheckpointError("one problem", "a.pt")) == "a.pt: one problem"
    two = pickle.loads(pickle.dumps(CheckpointError(["one", "two"], "a.pt")))
    assert two.problems == ["one", "two"] and two.path == "a.pt" and str(two) == "a.pt: 2 problems:\n  - one\n  - two"
