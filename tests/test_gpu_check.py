"""bench/gpu_check.sh's dry run: every step of the GPU check on the CPU at tiny sizes (the candidates' A/B
through Triton's interpreter), so that the one script a GPU window runs cannot rot between windows. Its
$PYTHON is tests/warm_python.py's client (conftest.py's warm_python): each step runs in a child of one
interpreter that imported torch and fusedvq once (the steps' own work takes seconds; seven imports of torch
took half a minute)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def test_dry_run_walks_every_step(tmp_path, warm_python):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=str(warm_python), BENCH_SECONDS="5",
               TEST_SECONDS="60")
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "candidates' A/B exit status: 0" in report and "benchmark exit status: 0" in report
    assert "P partials exit status: 0" in report and "| loop / fused [P, B, K] |" in report
    ab = (tmp_path / "ab_kernels.md").read_text()
    # both settings of the switch ran, gave the same loss (a difference is listed as a failure), and a winner
    # line in TUNING's form came out for every case the candidate covers
    assert "forward_loads = 'rows'" in ab and "## Failures" not in ab
    assert ab.count("TUNING.forward_loads = ") == 2


@pytest.mark.parametrize("args, stdin, status, out, err", [
    (["-c", "import sys; print(sys.argv, __name__); sys.exit(3)", "a"], "", 3, "['-c', 'a'] __main__\n", ""),
    (["-c", "raise ValueError('boom')"], "", 1, "", "ValueError: boom"),
    (["-", "x"], "import sys, os; print(sys.argv, sys.path[0], os.environ['WARM'])", 0, "['-', 'x']  yes\n", ""),
    (["-m", "fusedvq", "--version"], "", 0, "fusedvq 0.1.0\n", ""),
    (["bench/ab_kernels.py", "--help"], "", 0, "usage: ab_kernels.py", ""),
    (["-X", "dev"], "", 2, "", "warm_python: option -X is not served"),
])
def test_the_warm_python_runs_a_command_as_python_does(warm_python, args, stdin, status, out, err):
    """Exit status, stdout and stderr's last line as python's (a step's status is what the report reads)."""
    got = subprocess.run([str(warm_python), *args], cwd=ROOT, env=dict(os.environ, WARM="yes"), input=stdin,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == status and got.stdout.startswith(out) and (out or not got.stdout), got.stderr
    assert (got.stderr.splitlines() or [""])[-1] == err
