"""The reader's settings and how its child ends, said in words: the overrides FUSEDVQ_LOAD_SECONDS,
FUSEDVQ_LOAD_MEMORY_MB and FUSEDVQ_LOAD_ISOLATION are checked (a value they do not take is a CheckpointError
naming the variable and what it takes); a caller under a hard address-space limit (ulimit -v) still reads a
legitimate file, the child's budget fitted under it; a child stopped by its CPU-time or memory limit says
which."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckpt_factory import make_plain_run, write_checkpoint
from fusedvq.checkpoint import CheckpointError, diagnose, load_feature_spec
from fusedvq.checkpoint.isolation import BoundExceeded, _reap, read_bounded
from fusedvq.checkpoint.limits import Limits

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ck"), make_plain_run(D=20, K=12, num_categories=2))


@pytest.mark.parametrize("name, value", [
    ("FUSEDVQ_LOAD_SECONDS", "inf"), ("FUSEDVQ_LOAD_SECONDS", "1e20"), ("FUSEDVQ_LOAD_SECONDS", "nan"),
    ("FUSEDVQ_LOAD_SECONDS", "2s"), ("FUSEDVQ_LOAD_SECONDS", "0"), ("FUSEDVQ_LOAD_SECONDS", "-1"),
    ("FUSEDVQ_LOAD_MEMORY_MB", "inf"), ("FUSEDVQ_LOAD_MEMORY_MB", "-1"), ("FUSEDVQ_LOAD_MEMORY_MB", "lots"),
    ("FUSEDVQ_LOAD_ISOLATION", "forkserver"), ("FUSEDVQ_LOAD_ISOLATION", "Spawn"),
])
def test_an_override_it_does_not_take_is_said_with_what_it_takes(checkpoint, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(CheckpointError, match=rf"{name}='{value}' is not a setting fusedvq accepts: it takes") as info:
        load_feature_spec(checkpoint)
    assert "fork" in str(info.value) if "ISOLATION" in name else "greater than 0" in str(info.value)
    assert any(name in problem for problem in diagnose(checkpoint))


@pytest.mark.parametrize("name, value", [("FUSEDVQ_LOAD_SECONDS", "3.5"), ("FUSEDVQ_LOAD_MEMORY_MB", "512"),
                                         ("FUSEDVQ_LOAD_ISOLATION", "fork"), ("FUSEDVQ_LOAD_SECONDS", "")])
def test_overrides_it_takes(checkpoint, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert load_feature_spec(checkpoint).num_kept == 12


_UNDER_A_HARD_LIMIT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from fusedvq.checkpoint import load_feature_spec
from fusedvq.checkpoint.isolation import BoundExceeded, read_bounded
from fusedvq.checkpoint.limits import Limits, virtual_size
first = load_feature_spec(sys.argv[2])  # under the shell's `ulimit -v 4000000`
room = 128 << 20  # less than the 384 MiB the child would ask for
limit = virtual_size() + room
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # (soft and hard, as `ulimit -v` sets them)
spec = load_feature_spec(sys.argv[2])
limits = Limits.for_file(0)
try:
    read_bounded(lambda path: bytearray(1 << 30), Path(sys.argv[2]), limits)
    said = "read"
except BoundExceeded as err:
    said = str(err)
print(json.dumps({"first": first.num_kept, "kept": spec.num_kept, "memory": limits.memory, "requested": limits.requested, "said": said}))
"""


def test_a_hard_address_space_limit_fits_the_childs_budget_under_it(checkpoint):
    """Under `ulimit -v 4000000`, then under a limit that leaves 128 MiB: a legitimate file loads; a read
    stopped for memory says the budget was cut, and by what."""
    proc = subprocess.run(["bash", "-c", 'ulimit -v 4000000 && exec "$0" -c "$1" "$2" "$3"', sys.executable,
                           _UNDER_A_HARD_LIMIT, str(HERE), str(checkpoint)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["first"] == got["kept"] == 12
    assert got["requested"] == 384 << 20 and got["memory"] <= 128 << 20
    assert "ran out of memory" in got["said"] and "cut from 384 MiB" in got["said"] and "ulimit -v" in got["said"]


def test_a_child_stopped_by_its_cpu_time_limit_says_so():
    """(What the spawned interpreter's exit status -24 means, in words.)"""
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGXCPU)"])
    assert proc.wait(timeout=60) == -signal.SIGXCPU
    assert _reap(0, proc, kill=False) == "its CPU-time limit"


def _allocates_a_tensor(path):
    return torch.empty(1 << 32, dtype=torch.uint8)  # (torch's allocator raises RuntimeError, not MemoryError)


def test_a_child_out_of_memory_says_so_whoever_allocated(tmp_path):
    with pytest.raises(BoundExceeded, match=r"ran out of memory under its limits \(2.0 s, 256 MiB more memory\)"):
        read_bounded(_allocates_a_tensor, tmp_path, Limits(seconds=2.0, memory=256 << 20))
