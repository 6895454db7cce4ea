"""kernels/plan.py's KernelLauncher: the direct launch passes Triton's launcher exactly what Triton's own
launch passes, and reuses a compiled kernel only where Triton would pick the same one (tests/launch_check.py,
no GPU)."""

import pytest

triton = pytest.importorskip("triton")
from helpers import run_compiler_check  # noqa: E402


@pytest.fixture(scope="module")
def cases():
    return {c["case"]: c for c in run_compiler_check("launch_check.py")}


def test_direct_launch_passes_what_triton_passes(cases):
    assert set(cases) == {"mean", "sum, B = 1", "misaligned x", "B = 48"}
    for case in cases.values():
        assert case["same_arguments"] and case["hooks"] == [None, None], case
        assert case["cached_is_tritons_choice"], case


def test_a_new_specialization_gets_its_own_kernel(cases):
    # Every new argument signature is a cache entry, and Triton's choice decides the kernel behind it:
    # B = 1 and a misaligned pointer are new specializations, B = 48 (16 divides it) is B = 64's kernel.
    names = ("mean", "sum, B = 1", "misaligned x", "B = 48")
    assert [cases[name]["cached"] for name in names] == [1, 1, 1, 1]
    assert [cases[name]["kernel"] for name in names] == [0, 1, 2, 0]


def test_host_helpers_match_triton():
    from fusedvq.kernels.tiles import cdiv, next_power_of_2

    for n in range(1, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 7, 8, 256):
            assert cdiv(n, d) == triton.cdiv(n, d)
