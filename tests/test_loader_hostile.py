"""Small hostile files (tests/hostile_files.py) end as a load or a CheckpointError within seconds and well
under 1 GB in the calling process, whatever they do: each is read in a fresh interpreter under a 6 GB
address-space limit, timed, and its peak memory measured (the caller's and the bounded children's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostile_files import HOSTILE

HERE = Path(__file__).resolve().parent

# The files are built by the test's process, so that the peak RSS measured here is the reads' alone.
_PROBE = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
def peak():  # this program's peak RSS: VmHWM starts afresh at exec, where ru_maxrss keeps the forking parent's
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
sys.path.insert(0, sys.argv[1])
import hostile_files
from fusedvq.checkpoint import CheckpointError, load_feature_spec
for name, path in json.loads(sys.argv[2]).items():
    start = time.monotonic()
    try:
        load_feature_spec(path, require_stats=name in hostile_files.READ_WITH_STATISTICS)
        kind, text = "loaded", ""
    except CheckpointError as err:
        kind, text = "CheckpointError", str(err)
    except BaseException as err:
        kind, text = type(err).__name__, str(err)
    print(json.dumps({"name": name, "kind": kind, "seconds": time.monotonic() - start, "text": text[:1000],
                      "tail": text[-300:], "length": len(text),
                      "peak": peak()}))
usage = {"self": peak(), "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss << 10}
print(json.dumps(usage))
"""


def test_small_hostile_files_end_within_seconds_and_1_gb(tmp_path):
    """Each file of hostile_files (a quadratic codec, a huge tuple hashed again and again, thousands of
    foreign class names, a tensor whose file-set numel hides 2^36 entries, a legacy file naming 33 foreign
    classes, stride-0 views of 4M entries each, names of 50,000 characters quoted in thousands of problems,
    30,000 categories, a zip directory of 70,000 members, two data.pkl members) ends as a load or a
    CheckpointError in under 5 s, under 1 GB of peak RSS in every process, in a fresh interpreter under a 6 GB
    address-space limit."""
    built = {name: str(make(tmp_path / (name.replace(" ", "_") + ".pt"))) for name, make in HOSTILE.items()}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(HERE), json.dumps(built)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    *results, usage = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["name"] for r in results] == list(HOSTILE)
    for r in results:
        assert r["kind"] in ("loaded", "CheckpointError") and r["seconds"] < 5, r
    kinds = {r["name"]: r for r in results}
    assert "codec 'punycode'" in kinds["quadratic codec"]["text"]
    assert "did not finish reading within" in kinds["rehashed tuple"]["text"]
    assert "4,000 classes" in kinds["many foreign names"]["text"]
    assert "attributes chosen by the file" in kinds["tensor with attributes"]["text"]
    assert kinds["legacy with foreign names"]["kind"] == "loaded"
    assert "a file of its size can hold" in kinds["stride-0 categories"]["text"]
    assert "a file of its size can hold" in kinds["stride-0 statistics"]["text"]
    assert kinds["long names"]["length"] < 100_000 and "more problems" in kinds["long names"]["tail"]
    assert "zip directory of 70,00" in kinds["many members"]["text"]
    assert "2 members named 'archive/data.pkl'" in kinds["two data records"]["text"]
    assert max(usage.values()) < 1 << 30, (usage, [(r["name"], r["peak"] >> 20) for r in results])  # (MiB after each)
