"""The candidate kernels, selectable but not the default, through the same parity checks as today's: the
whole-row forward (kernels/row_loads.py, TUNING.forward_loads = "rows") runs test_parity.py's interpreter
checks (every shape, option, duplicates, NaN/Inf, strides, dtypes, large offsets), the target gap's, and
the per-column ones, with the candidate switched on (on the cases it runs: Triton, norm "none" / "stats"); and
it must actually be the kernel that ran."""

import functools

import pytest
import torch

import fusedvq
from helpers import check_parity, interpreting
from oracle import random_case

pytestmark = pytest.mark.skipif(not interpreting, reason="the candidates run through Triton's interpreter here")

# The parity suites, collected again in this module (so with the fixture below) on the candidate's cases
# alone: test_interpreter_large aside, whose case is run below once.
import test_columns  # noqa: E402
import test_parity  # noqa: E402
import test_target_gap  # noqa: E402


def _is_candidate_case(name: str, value) -> bool:
    """Whether a parameter's value is one the candidate runs: Triton (not the PyTorch paths), not norm="batch"."""
    if name == "backend_device":
        return tuple(value) == ("triton", "cpu")
    return {"path": value == "triton", "norm": value != "batch"}.get(name, True)


def _candidate_cases(test):
    """`test` again, parametrized only over the cases the candidate runs: the others (today's code runs them,
    in the suite the test comes from) are not generated. Its own marks stay."""
    def again(*args, **kwargs):
        return test(*args, **kwargs)

    functools.update_wrapper(again, test)
    marks = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names, values = mark.args[0], mark.args[1]
            split = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
            kept = []
            for value in values:
                row = value.values if isinstance(value, type(pytest.param(None))) else (
                    (value,) if len(split) == 1 else tuple(value))
                if all(_is_candidate_case(n, v) for n, v in zip(split, row)):
                    kept.append(value)
            mark = pytest.mark.parametrize(names, kept, **mark.kwargs)
        marks.append(mark)
    again.pytestmark = marks
    return again


for _module, _names in ((test_parity, ["test_dtypes", "test_large_offset_stats_keep_float32_accuracy", "test_nan_to_num",
                                       "test_non_contiguous_integer_index", "test_norm_none", "test_options",
                                       "test_shapes", "test_strides"]),
                        (test_target_gap, ["test_gap_matches_the_oracle", "test_gap_with_float32_edge_columns"]),
                        (test_columns, ["test_columns_and_weights_against_oracle", "test_float32_edge_columns",
                                        "test_target_gap_duplicates_and_non_finite"])):
    for _name in _names:
        globals()[_name] = _candidate_cases(getattr(_module, _name))


@pytest.fixture(autouse=True)
def rows_forward(monkeypatch):
    """TUNING.forward_loads = "rows" for the test; yields the list of whole-row launches it made."""
    from fusedvq.kernels import row_loads, tiles

    monkeypatch.setattr(tiles.TUNING, "forward_loads", "rows")
    launches = []
    real = row_loads.rows_forward

    def counted(*args, **kwargs):
        launches.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(row_loads, "rows_forward", counted)
    monkeypatch.setattr(fusedvq.kernels, "rows_forward", counted)  # (the op calls the package's entry point)
    yield launches


def _inputs(B, D, K, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, generator=g)
    x = (torch.randn(B, D, generator=g) * std + mean).to(dtype)
    return x, torch.randn(B, K, generator=g).to(dtype), columns, mean, std


@pytest.mark.parametrize("D,K", [(187, 171), (270, 143), (1024, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_candidate_is_what_runs_on_contiguous_rows(rows_forward, D, K, dtype):
    B = 257 if (D, K) == (187, 171) else 33  # (the interpreter's time)
    x, r, columns, mean, std = _inputs(B, D, K, seed=D + B, dtype=dtype)
    check_parity("triton", "cpu", x, r, columns, mean, std)
    assert rows_forward == [x.shape]


@pytest.mark.parametrize("B", [131, pytest.param(4099, marks=pytest.mark.sweep)])
@pytest.mark.parametrize("reduction", ["mean", "column"])
def test_chunked_rows_forward(rows_forward, reduction, B):
    # The forward is the candidate's part: its value at B = 131 (17 chunks of 8 rows over 8 programs, the last
    # of 3; the 4099-row sweep: 513 chunks), no backward (today's kernel, which test_parity runs).
    x, r, columns, mean, std = _inputs(B, 187, 171, seed=3)
    with torch.no_grad():
        got = fusedvq.masked_mse(x, r, columns, mean, std, reduction=reduction, backend="triton")
    e = (((x.double() - mean.double()) / std.double())[:, columns] - r.double()) ** 2
    want = e.mean() if reduction == "mean" else e.mean(0)
    assert (got.double() - want).norm() / want.norm() <= 1e-6 and rows_forward == [x.shape]


def test_strided_rows_take_todays_kernel(rows_forward):
    x, r, columns, mean, std = _inputs(40, 187, 171, seed=1)
    check_parity("triton", "cpu", x.t().contiguous().t(), r.clone(), columns, mean, std)
    unaligned = torch.randn(40 * 187 + 1)[1:].view(40, 187)  # 4 bytes past 16-byte alignment
    unaligned.copy_(x)
    check_parity("triton", "cpu", unaligned, r.clone(), columns, mean, std)
    assert rows_forward == []


def test_the_default_is_todays_kernel():
    from fusedvq.kernels.tiles import Tuning, _tuning_from_environment

    assert Tuning().forward_loads == "gather"
    assert _tuning_from_environment().forward_loads in ("gather", "rows")


def test_a_bad_switch_is_refused(monkeypatch):
    from fusedvq.kernels.tiles import _tuning_from_environment

    monkeypatch.setenv("FUSEDVQ_FORWARD_LOADS", "wide")
    with pytest.raises(ValueError, match="FUSEDVQ_FORWARD_LOADS='wide': expected one of gather, rows"):
        _tuning_from_environment()


def test_module_and_column_reduction_under_the_candidate(rows_forward):
    x, r, columns, mean, std = _inputs(9, 187, 171, seed=2)
    cols = fusedvq.MaskedMSELoss(columns, mean, std, reduction="column", backend="triton")(x, r)
    want = ((((x.double() - mean.double()) / std.double())[:, columns] - r.double()) ** 2).mean(0)
    assert (cols.double() - want).norm() / want.norm() < 1e-6 and len(rows_forward) == 1
