"""Property test: any shape, any strides, any index (duplicates included), every backend, vs the oracle."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import check_parity, interpreting
from oracle import strided

BACKENDS = ["reference"] + (["triton"] if interpreting else [])


@st.composite
def cases(draw):
    B = draw(st.integers(1, 70))
    D = draw(st.integers(1, 300))
    K = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    as_mask = draw(st.booleans()) and K <= D
    if as_mask:
        columns = torch.zeros(D, dtype=torch.bool)
        columns[torch.randperm(D, generator=g)[:K]] = True
    else:
        columns = torch.randint(0, D, (K,), generator=g)  # duplicates likely when K > D
    mean = torch.randn(D, generator=g)
    std = torch.rand(D, generator=g) + 0.1
    x = torch.randn(B, D, generator=g) * 2
    r = torch.randn(B, K, generator=g)
    layouts = st.sampled_from(["contiguous", "slice", "transposed"])
    return dict(x=strided(x, draw(layouts)), r=strided(r, draw(layouts)), columns=columns, mean=mean, std=std,
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                norm=draw(st.sampled_from(["stats", "none"])),
                stats=draw(st.sampled_from(["raw", "masked"])))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(case=cases())
def test_any_shape_and_layout(backend, case):
    check_parity(backend, "cpu", case["x"], case["r"], case["columns"], case["mean"], case["std"],
                 stats=case["stats"], reduction=case["reduction"], norm=case["norm"])
