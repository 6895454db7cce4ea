#!/usr/bin/env bash
# The GPU check, end to end, for a CUDA machine without network access (torch, triton, pytest,
# pytest-benchmark, hypothesis and matplotlib installed there):
#
#     bash bench/gpu_check.sh                    # writes bench/out/
#     OUT=some/folder bash bench/gpu_check.sh
#
# Prints the GPU and the versions, measures the copy bandwidth, runs the gpu-marked tests (a failure is
# recorded, not fatal), runs the benchmark matrix, and writes under $OUT (relative to the repository root)
# env.txt, gpu_tests.txt, ab_kernels.md (today's kernels against each candidate, kernel time, with the
# winner per case as the TUNING edit that makes it the default: bench/ab_kernels.py), bench.json, bench.md
# (the loss alone, and the VQ-led step's clean+mse cases right
# after the targets'), captured.md (the loss step replayed from a CUDA graph, fused against the eager fix:
# bench/captured_step.py), partials.md (P = 24 partial reconstructions: kernel time, and the step against the
# project's loop at B = 4, 1024, 65536: bench/partials_gpu.py), bench.png, profile.txt (where a step's time goes:
# bench/profile_step.py) and report.md, the one to read (bench_log.txt too if the benchmark failed);
# bench/results/README.md says how to commit a run. Ends with a short table.
#
# At most 8 minutes on an H100 with the default budgets, which the environment can shorten:
#   TEST_SECONDS   the gpu-marked tests are cut after this long (default 180; run 4 at a time when
#                  pytest-xdist is installed);
#   AB_SECONDS     the candidates' A/B is cut after this long (default 90);
#   BENCH_SECONDS  the benchmark starts no new case after this long (default 110; the cases the targets
#                  read come first) and is cut 90 s later;
#   the P partials' timings are cut at 90 s, the profile at 75 s.
#
# DRY_RUN=1 walks the same steps on the CPU at tiny sizes, each once, and installs nothing: a check of the
# script (tests/test_gpu_check.py), in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
started=$(date +%s)

if [ "$DRY_RUN" = 1 ]; then
  # Each step once, in seconds: one benchmark case and one profiled size, without the compiled provider
  # (torch.compile's warm-up; the suite's bench/ smoke tests run it), and one file of gpu-marked tests.
  device=cpu
  bench_seconds=${BENCH_SECONDS:-60}
  bench_args=(--sizes 4 --dtypes float32 --norms stats --modes forward --providers reference,eager
              --seconds-per-case 0.05 --max-seconds "$bench_seconds")
  profile_args=(--sizes 4 --providers reference,eager)
  partials_args=(--sizes 4)
  test_seconds=${TEST_SECONDS:-120}
  test_paths=(tests/test_gpu.py)
  ab_args=(--dry-run)
else
  device=cuda
  bench_seconds=${BENCH_SECONDS:-110}
  bench_args=(--seconds-per-case 0.5 --max-seconds "$bench_seconds")
  profile_args=()
  partials_args=()
  test_seconds=${TEST_SECONDS:-180}
  test_paths=(tests)
  ab_args=()
fi
ab_seconds=${AB_SECONDS:-90}
parallel=()
if "$PYTHON" -c "import xdist" 2>/dev/null && [ "$DRY_RUN" != 1 ]; then parallel=(-n 4); fi

echo "== GPU and versions"
nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"

if [ "$DRY_RUN" != 1 ]; then
  echo "== install"
  "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
fi

echo "== versions and copy bandwidth"
"$PYTHON" - "$device" <<'EOF' | tee "$OUT/env.txt"
import datetime, platform, subprocess, sys, torch
from fusedvq.tools.benchmark import copy_bandwidth
try:
    import triton
    triton_version = triton.__version__
except Exception as err:  # reported, not fatal: the reference path still runs
    triton_version = f"not importable ({err})"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, check=True).stdout.split()[0]
except Exception:
    driver = "–"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"- device: {gpu}")
print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}")
print(f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, driver {driver}")
device = sys.argv[1]
rate = copy_bandwidth(device, nbytes=1 << 30 if device == "cuda" else 1 << 26)
print(f"- copy bandwidth ({device}, bytes read + written): {rate / 1e9:.0f} GB/s")
EOF

echo "== gpu-marked tests"
set +e
timeout "$test_seconds" "$PYTHON" -m pytest -q -m gpu "${test_paths[@]}" -p no:cacheprovider "${parallel[@]}" 2>&1 \
  | tee "$OUT/gpu_tests.txt"
test_status=${PIPESTATUS[0]}
set -e
case "$test_status" in
  0) tests_line="passed" ;;
  5) tests_line="none collected" ;;
  124) tests_line="cut at ${test_seconds} s (exit 124)" ;;
  *) tests_line="FAILED (exit $test_status)" ;;
esac
tests_line="$tests_line: $(grep -E '(passed|failed|error|skipped|deselected)' "$OUT/gpu_tests.txt" | tail -n 1 || true)"

echo "== candidates against today's kernels"
set +e
timeout "$ab_seconds" "$PYTHON" bench/ab_kernels.py "${ab_args[@]}" --out "$OUT/ab_kernels.md" >"$OUT/ab_log.txt" 2>&1
ab_status=$?
set -e
sed -n '/^## Verdicts/,$p' "$OUT/ab_log.txt"

echo "== benchmark"
set +e
timeout $(( bench_seconds + 90 )) "$PYTHON" -m fusedvq.tools.benchmark --device "$device" --out "$OUT" --no-progress "${bench_args[@]}" \
  >"$OUT/bench_log.txt" 2>&1
bench_status=$?
set -e
tail -n 2 "$OUT/bench_log.txt"
if [ "$bench_status" = 0 ]; then rm -f "$OUT/bench_log.txt"; fi  # bench.md holds the same table

echo "== captured step"
set +e
timeout 60 "$PYTHON" bench/captured_step.py --out "$OUT/captured.md" 2>&1 | tail -n 8
set -e

echo "== P partials against one target"
set +e
timeout 90 "$PYTHON" bench/partials_gpu.py --device "$device" "${partials_args[@]}" --out "$OUT/partials.md" 2>&1 \
  | tail -n 12
partials_status=${PIPESTATUS[0]}
set -e

echo "== profile"
set +e
timeout 75 "$PYTHON" bench/profile_step.py --device "$device" "${profile_args[@]}" >"$OUT/profile.txt" 2>&1
profile_status=$?
set -e
sed -n '/^## Summary/,$p' "$OUT/profile.txt"

{
  echo "# GPU check"
  echo
  cat "$OUT/env.txt"
  echo "- gpu-marked tests: $tests_line (full log: gpu_tests.txt)"
  echo "- candidates' A/B exit status: $ab_status (ab_kernels.md; ab_log.txt); benchmark exit status: $bench_status;" \
    "profile exit status: $profile_status (profile.txt); P partials exit status: $partials_status" \
    "(partials.md); whole check:" \
    "$(( $(date +%s) - started )) s"
  echo
  if [ -f "$OUT/bench.md" ]; then sed 's/^#/##/' "$OUT/bench.md"; else echo "(no benchmark report: bench_log.txt)"; fi
  if [ -f "$OUT/captured.md" ]; then echo; cat "$OUT/captured.md"; fi
  if [ -f "$OUT/partials.md" ]; then echo; cat "$OUT/partials.md"; fi
  if [ -f "$OUT/ab_kernels.md" ]; then echo; sed 's/^#/##/' "$OUT/ab_kernels.md"; fi
} >"$OUT/report.md"

echo
echo "== summary ($OUT/report.md)"
grep -E '^- (device|gpu-marked|copy)' "$OUT/report.md" || true
if [ -f "$OUT/bench.md" ]; then
  awk '/^## /{p = ($0 ~ /^## norm=(stats, float32, forward\+backward|(stats|batch), float32, clean\+mse)/)} p' "$OUT/bench.md"
  sed -n '/^## Targets/,$p' "$OUT/bench.md"
fi
if [ -f "$OUT/ab_kernels.md" ]; then sed -n '/^## Verdicts/,$p' "$OUT/ab_kernels.md"; fi
