"""kernels/launchers.py's KernelLauncher: the direct launch passes Triton's launcher exactly what Triton's own
launch passes, and reuses a compiled kernel only where Triton would pick the same one (tests/launch_check.py,
no GPU); a launch's scratch (the reductions' ticket counter and partials) survives a launch that fails part-way and is
never shared between threads."""

import threading

import pytest
import torch

triton = pytest.importorskip("triton")
import fusedvq  # noqa: E402
from helpers import needs_interpreter, run_compiler_check  # noqa: E402
from oracle import rel_err  # noqa: E402


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


@needs_interpreter
def test_failed_launch_does_not_poison_later_losses():
    """A launch that fails part-way (here the moments kernel, handed an eps the last program cannot use)
    must not leave the shared ticket counter non-zero: every later mean/sum loss stays right."""
    from fusedvq.kernels import batch_norm

    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(300, 9, generator=g), torch.randn(300, 9, generator=g)
    index = torch.arange(9)
    with pytest.raises(Exception):
        batch_norm.column_moments(x, index, "1e-8", False, finalize=True)
    for norm in ("none", "batch"):
        loss = fusedvq.masked_mse(x, r, index, norm=norm, backend="triton")
        want = fusedvq.masked_mse(x, r, index, norm=norm, backend="reference")
        assert rel_err(loss, want) <= 1e-5, norm


@needs_interpreter
def test_threads_do_not_share_reduction_scratch():
    """Concurrent mean losses from several threads on CPU tensors (interpreter): each gets its own."""
    results, errors = {}, []
    g = torch.Generator().manual_seed(1)
    cases = [(torch.randn(200, 7, generator=g) * (i + 1), torch.randn(200, 7, generator=g)) for i in range(4)]

    def work(i):
        try:
            x, r = cases[i]
            results[i] = [fusedvq.masked_mse(x, r, torch.arange(7), norm="none", backend="triton") for _ in range(3)]
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (x, r) in enumerate(cases):
        want = torch.nn.functional.mse_loss(x.double(), r.double())
        assert all(rel_err(v, want) <= 1e-5 for v in results[i]), i
