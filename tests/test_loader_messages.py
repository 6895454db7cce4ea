"""A file chooses its names and how many there are; what the loaders say about it stays short: a name is
quoted shortened, a list cut with "and N more", an error holds a bounded number of sentences, and `fusedvq
check` lists a bounded number of categories."""

from __future__ import annotations

import io

import numpy as np
import pytest

from hostile_files import long_names
from fusedvq.checkpoint import CheckpointError, diagnose, load_feature_spec
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
