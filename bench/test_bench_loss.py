"""One step of the loss (forward, or forward+backward) per provider and case, under pytest-benchmark.

The default test run passes --benchmark-disable (pyproject's addopts): each step runs once, as a smoke test,
and pytest-benchmark prints no tables. To time them, ask for it:

    pytest bench --benchmark-enable                          # a few small cases, 3 rounds each
    FUSEDVQ_BENCH=full pytest bench --benchmark-enable       # the whole matrix, 20 rounds, CUDA if present

Side-by-side ratios with their spread are `fusedvq bench`'s job; these tables time each provider alone. The providers, inputs, steps and
byte counts are fusedvq.tools.benchmark's; this file only times them (`fusedvq bench` times the same providers
side by side and writes the reports). A step synchronizes the device before it returns, so the wall time
pytest-benchmark reads is the step's.
"""

import os

import pytest

from fusedvq.tools import benchmark as fb

FULL = os.environ.get("FUSEDVQ_BENCH") == "full"
ROUNDS = 20 if FULL else 3

if FULL:
    CASES = fb.matrix(fb.SIZES, fb.DTYPES, fb.NORMS, fb.MODES)
else:
    CASES = fb.matrix((4, 1024), ("float32",), ("stats",), fb.MODES) + [fb.Case(64, "float32", "batch",
                                                                                 "forward+backward")]


def case_id(case) -> str:
    return f"B{case.B}-{case.dtype}-{case.norm}-{case.mode.replace('+', '_')}"


def _marks(provider, case) -> list:
    """"fused" is the Triton kernels on CUDA tensors: a gpu case (tests/ run them through the interpreter).
    "compiled" compiles each norm and mode (seconds each on a CPU): in the default suite at B = 4 with norm
    "stats", every mode; its other cases are sweeps (--sweeps) unless FUSEDVQ_BENCH=full."""
    if provider == "fused":
        return [pytest.mark.gpu]
    if provider == "compiled" and not FULL and (case.B != 4 or case.norm != "stats"):
        return [pytest.mark.sweep]
    return []


@pytest.fixture(autouse=True)
def compiler(request, monkeypatch):
    """Timed (--benchmark-enable, FUSEDVQ_BENCH=full), "compiled" is inductor's, as a user's torch.compile;
    the default suite's smoke run of each step traces it with aot_eager (inductor's C++ builds take seconds
    each: tests/test_op.py runs inductor on fusedvq's ops)."""
    timed = request.config.getoption("benchmark_enable") or not request.config.getoption("benchmark_disable")
    if not FULL and not timed:
        monkeypatch.setattr(fb.providers, "COMPILER", "aot_eager")


@pytest.mark.parametrize("provider, case", [pytest.param(p, c, marks=_marks(p, c), id=f"{case_id(c)}-{p}")
                                            for c in CASES for p in fb.PROVIDERS])
def test_loss_step(benchmark, device, copy_rate, provider, case):
    try:
        loss_fn = fb.make_loss(provider, case, device)
    except fb.Unavailable as err:
        pytest.skip(str(err))
    inputs = fb.make_inputs(case, device)
    step = fb.make_step(loss_fn, inputs, case.mode)

    def synchronized_step():
        step()
        fb.synchronize(device)

    synchronized_step()  # compilation and first touches stay out of the rounds
    benchmark.group = case_id(case)
    benchmark.extra_info.update(device=device, bytes=fb.bytes_moved(case))
    if provider != "compiled":  # (saved-tensor hooks would be traced into the compiled function)
        benchmark.extra_info["saved_bytes"] = fb.saved_bytes(loss_fn, inputs)
    if device == "cuda":
        benchmark.extra_info["peak_bytes"] = fb.peak_bytes(step, device, inputs)
    benchmark.pedantic(synchronized_step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = fb.bytes_moved(case) / median / 1e9
        if copy_rate:
            benchmark.extra_info["copy_fraction"] = fb.bytes_moved(case) / median / copy_rate
