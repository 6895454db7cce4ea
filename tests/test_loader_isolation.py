"""Reading an untrusted file ends in bounded time and memory whatever torch's unpickler does inside: the
read runs in a child process under a wall clock and an address-space limit (fusedvq/checkpoint/isolation.py),
which ends the child whatever it waits for, in a process with threads, CUDA or an odd SIGCHLD handler.
(What a file may declare is bounded before that: test_loader_sizes.py; what comes back: test_loader_wire.py.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from ckpt_factory import checkpoint_dict, make_plain_run
from hostile_files import rehashed_tuple
from fusedvq.checkpoint.isolation import BoundExceeded, ChildRefused, Limits, read_bounded
from fusedvq.checkpoint import CheckpointError, load_feature_spec, read_checkpoint

HERE = Path(__file__).resolve().parent

# --- the bound itself, where no scan finds anything ----------------------------------------------


def _sleeps(path):
    time.sleep(60)


def _allocates(path):
    return bytearray(4 << 30)


_HELD = threading.Lock()


def _waits_for_a_held_lock(path):
    with _HELD:
        return "never"


def _reads(path):
    return {"text": Path(path).read_text(), "tensor": torch.arange(6.0).view(2, 3).t()}


LIMITS = Limits(seconds=1.0, memory=256 << 20)


@pytest.mark.parametrize("reader, expected", [(_sleeps, "within 1.0 s"), (_allocates, "memory")])
def test_the_child_is_stopped_at_its_limits(tmp_path, reader, expected):
    start = time.monotonic()
    with pytest.raises((BoundExceeded, ChildRefused), match=expected):
        read_bounded(reader, tmp_path, LIMITS)
    assert time.monotonic() - start < 3


def test_a_lock_another_thread_held_at_the_fork_cannot_hang_the_read(tmp_path):
    """A training process has threads; a lock one of them holds stays held in a forked child. The wall
    clock ends the child whatever it waits for, and the parent's threads go on."""
    release = threading.Event()

    def hold():
        with _HELD:
            release.wait(10)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    time.sleep(0.05)
    try:
        start = time.monotonic()
        with pytest.raises(BoundExceeded):
            read_bounded(_waits_for_a_held_lock, tmp_path, LIMITS)
        assert time.monotonic() - start < 3
    finally:
        release.set()
        holder.join()


def test_loads_while_other_threads_compute(tmp_path):
    """Reads inside a process whose other threads run torch ops (intra-op pools active) all succeed."""
    path = tmp_path / "best_model.pt"
    torch.save(checkpoint_dict(make_plain_run(D=40, K=30, num_categories=3)), path)
    stop = threading.Event()

    def compute():
        a = torch.randn(256, 256)
        while not stop.is_set():
            a = torch.tanh(a @ a)

    workers = [threading.Thread(target=compute, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for _ in range(10):
            assert load_feature_spec(path).num_kept == 30
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_without_fork_a_fresh_interpreter_reads_under_the_same_wall_clock(tmp_path, monkeypatch):
    """(Its interpreter prints as it starts, as a sitecustomize may: that is not read as the result.)"""
    monkeypatch.setenv("FUSEDVQ_LOAD_ISOLATION", "spawn")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("print('hello from sitecustomize' * 100)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "site"), str(HERE), str(HERE.parent)]))
    (tmp_path / "note.txt").write_text("hello")
    got = read_bounded(_reads, tmp_path / "note.txt", LIMITS)
    assert got["text"] == "hello" and torch.equal(got["tensor"], torch.arange(6.0).view(2, 3).t())
    with pytest.raises(BoundExceeded, match="within"):
        read_bounded(_sleeps, tmp_path, Limits(seconds=-59.0, memory=256 << 20))  # 1 s after the import allowance


# --- the wall clock over what the scans pass, and the processes the read runs in ----------------


def test_the_rehashed_tuple_stops_at_the_wall_clock_not_the_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDVQ_LOAD_SECONDS", "0.5")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="within 0.5 s"):
        read_checkpoint(rehashed_tuple(tmp_path / "model.pt"))
    assert time.monotonic() - start < 2
    assert os.environ["FUSEDVQ_LOAD_SECONDS"] == "0.5"


@pytest.mark.gpu
def test_loads_inside_a_process_that_initialized_cuda(tmp_path):
    """A training process: CUDA initialized, a tensor on the device, a thread busy with it; the forked child
    maps everything to the CPU and never touches CUDA."""
    path = tmp_path / "best_model.pt"
    data = checkpoint_dict(make_plain_run(D=40, K=30, num_categories=3))
    data["on_device"] = torch.ones(3, device="cuda")
    torch.save(data, path)
    stop = threading.Event()

    def compute():
        a = torch.randn(512, 512, device="cuda")
        while not stop.is_set():
            a = torch.tanh(a @ a)
            torch.cuda.synchronize()

    worker = threading.Thread(target=compute, daemon=True)
    worker.start()
    try:
        for _ in range(5):
            spec = load_feature_spec(path)
            assert spec.num_kept == 30 and spec.feature_mask.device.type == "cpu"
        assert read_checkpoint(path)["on_device"].device.type == "cpu"
    finally:
        stop.set()
        worker.join()


def test_an_interrupted_read_ends_its_child(tmp_path, monkeypatch):
    """Ctrl-C (or MemoryError) while the parent reads the child's result: the child, blocked writing to a
    full pipe, is killed and reaped, and the interrupt reaches the caller at once."""
    from fusedvq.checkpoint import isolation

    path = tmp_path / "model.pt"
    torch.save({"feature_mask": torch.ones(3, dtype=torch.bool), "w": torch.randn(1 << 20)}, path)  # 4 MiB
    real_read = isolation._Pipe.read

    def interrupted(self, n):
        if n >= 1 << 20:
            raise KeyboardInterrupt
        return real_read(self, n)

    monkeypatch.setattr(isolation._Pipe, "read", interrupted)
    box, before = {}, _children()

    def run():
        try:
            read_checkpoint(path)
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the read hung after the interrupt"
    assert isinstance(box.get("error"), KeyboardInterrupt)
    assert _children() == before  # no child left behind, not even unreaped (a zombie is still a child)


def _children() -> set:
    """This process's child processes (Linux: /proc/PID/task/TID/children; the test process may have others,
    such as conftest's warm python)."""
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids.update(map(int, (task / "children").read_text().split()))
        except FileNotFoundError:  # a thread that ended meanwhile (its children pass to another thread)
            pass
    return pids


def test_a_parent_that_ignores_sigchld_still_reads(tmp_path):
    import signal

    path = tmp_path / "model.pt"
    torch.save({"feature_mask": torch.ones(3, dtype=torch.bool)}, path)
    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    try:
        for _ in range(5):
            assert read_checkpoint(path)["feature_mask"].all()
    finally:
        signal.signal(signal.SIGCHLD, before)
