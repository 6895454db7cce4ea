"""bench/gpu_check.sh's dry run: every step of the GPU check on the CPU at tiny sizes (the candidates' A/B
through Triton's interpreter), so that the one script a GPU window runs cannot rot between windows."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_walks_every_step(tmp_path):
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable, BENCH_SECONDS="5",
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
