"""An untrusted file is read in a child process under a wall-clock and a memory limit; only plain data
comes back.

Why: torch's weights-only unpickler runs no code a file names, but a small file can still make it (or what
reads its result) spend unbounded time or memory — a quadratic codec, a huge tuple hashed again and
again, a tensor whose view declares 2^36 entries. Refusing each trick as it is found is not a bound. So:

    parent ── fork ──► child: address-space limit = its size at the fork + `memory` bytes, CPU-time limit,
       │                       torch on one thread; runs `reader(path)` (the inert load, pickles.py), then
       │                       encodes the result as plain data (wire.py) and writes it to a pipe
       └── waits at most `seconds`, reads at most `memory` bytes, kills the child otherwise

The forked child runs only the reader: no CUDA (the load maps every storage to the CPU; a CUDA call after
a fork raises instead of hanging), no lock another thread held at the fork (the reader takes none; and if
it ever waited on one, the wall clock ends it: the bound never depends on the child behaving). Where
there is no fork (Windows), or `FUSEDVQ_LOAD_ISOLATION=spawn`, a fresh interpreter is started instead
(`python -m fusedvq.checkpoint.isolation`, slower: it imports torch) under the same wall clock, and under
the memory limit where the `resource` module exists.

What comes back is plain data (wire.py): containers, numbers, strings, arrays, tensors rebuilt as plain
tensors, records of foreign objects; a result of more than MAX_NODES objects or MAX_DEPTH levels is refused.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .wire import ResultDecoder, ResultEncoder


@dataclass(frozen=True)
class Limits:
    """How long and how much memory reading a file may take: `seconds` of wall clock, `memory` bytes more
    than the process held before (address space in the child; also the most the child may send back)."""

    seconds: float
    memory: int

    @classmethod
    def for_file(cls, size: int) -> "Limits":
        """2 s and 384 MiB, plus 1 s per 32 MiB and 6 bytes per byte of the file: a few hundred KB ends in
        about 2 s and well under 1 GB whatever it holds; an honest checkpoint reads at hundreds of MB/s.
        FUSEDVQ_LOAD_SECONDS / FUSEDVQ_LOAD_MEMORY_MB replace the base amounts."""
        seconds = float(os.environ.get("FUSEDVQ_LOAD_SECONDS", 2.0)) + size / (32 << 20)
        memory = int(float(os.environ.get("FUSEDVQ_LOAD_MEMORY_MB", 384)) * (1 << 20)) + 6 * size
        return cls(seconds, memory)


class BoundExceeded(Exception):
    """The child did not finish within its limits (or died): the message says which, in words."""


class ChildRefused(Exception):
    """The reader in the child raised `kind` with `message` (carried back as text; `problems` too, when the
    exception had a list of them, as CheckpointError has)."""

    def __init__(self, kind: str, message: str, problems=None):
        self.kind, self.problems = kind, problems
        super().__init__(message)


def read_bounded(reader: Callable[[Path], Any], path: Path, limits: Limits):
    """`reader(path)`'s result, computed in a child process within `limits` and rebuilt from plain data.
    Raises ChildRefused (the reader's own exception, as kind and text) or BoundExceeded."""
    if hasattr(os, "fork") and os.environ.get("FUSEDVQ_LOAD_ISOLATION", "fork") != "spawn":
        status, storages = _forked(reader, path, limits)
    else:
        status, storages = _spawned(reader, path, limits)
    if status[0] != "ok":
        raise ChildRefused(*status[1:])
    return ResultDecoder(storages).value(status[1])


# ---------------------------------------------------------------------------------------------------
# The child: run the reader, encode its result as plain data
# ---------------------------------------------------------------------------------------------------


def _child_send(reader: Callable[[Path], Any], path: Path, fd: int) -> None:
    """Run the reader and write its result to `fd`: the length of the marshalled tree (8 bytes), the tree
    (("ok", tree, storage sizes) or ("error", kind, text, problems)), then each storage's bytes."""
    storages: list = []
    try:
        torch.set_num_threads(1)  # nothing here is worth a thread pool, and a forked one may be broken
        encoder = ResultEncoder()
        tree = encoder.node(reader(path), 0)
        storages = encoder.storages
        status = ("ok", tree, [s.nbytes for s in storages])
    except MemoryError:
        status = ("error", "MemoryError", "it needs more memory than the file could honestly fill")
    except BaseException as err:  # noqa: BLE001 - everything goes back as text
        problems = getattr(err, "problems", None)
        problems = [str(p)[:4000] for p in problems[:64]] if isinstance(problems, list) else None
        status = ("error", type(err).__name__, str(err)[:4000], problems)
    blob = marshal.dumps(status)
    for chunk in (len(blob).to_bytes(8, "little"), blob, *storages):
        view = memoryview(chunk).cast("B")
        while view:
            view = view[os.write(fd, view):]


def _limit_child(limits: Limits) -> None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows: the wall clock is the bound
        return
    vm = _virtual_size()
    if vm is not None:
        cap = vm + limits.memory
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + limits.seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _virtual_size():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - no procfs (macOS): only the wall clock bounds the child
        return None
    return None


# ---------------------------------------------------------------------------------------------------
# The parent: run the child, rebuild its plain data
# ---------------------------------------------------------------------------------------------------


def _forked(reader, path: Path, limits: Limits):
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 warns about fork with threads
        pid = os.fork()
    if pid == 0:  # the child: never returns to the caller's code, whatever happens
        code = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _limit_child(limits)
            _child_send(reader, path, write_end)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        return _receive(read_end, limits, pid=pid)
    finally:
        os.close(read_end)


def _spawned(reader, path: Path, limits: Limits):
    """The fallback without fork: a fresh interpreter runs the same child code (python -m fusedvq.checkpoint.isolation)."""
    target = f"{reader.__module__}:{reader.__qualname__}"
    command = [sys.executable, "-m", "fusedvq.checkpoint.isolation", target, os.fspath(path), repr(limits.seconds),
               str(limits.memory)]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        # Starting Python and importing torch is not the file's doing: it gets its own minute.
        return _receive(proc.stdout.fileno(), Limits(limits.seconds + 60.0, limits.memory), proc=proc)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _receive(fd: int, limits: Limits, *, pid: int = 0, proc=None):
    """(status, storages) as _child_send wrote them to `fd`, within the limits; the child is reaped (killed
    if need be). Each storage is read straight into the buffer its tensors will use."""
    pipe = _Pipe(fd, time.monotonic() + limits.seconds)
    why, done = None, False
    try:
        size = int.from_bytes(pipe.read(8), "little")
        if size > limits.memory:
            raise _Over(f"what it holds exceeds the {limits.memory >> 20:,} MiB a file of its size may fill")
        status = marshal.loads(pipe.read(size))
        storages = []
        if status[0] == "ok":
            if sum(status[2]) > limits.memory:
                raise _Over(f"its tensors exceed the {limits.memory >> 20:,} MiB a file of its size may fill")
            storages = [pipe.read(n) for n in status[2]]
        done = True
    except _Over as over:
        why = str(over)
    except EOFError:
        why = ""
    except TimeoutError:
        why = f"it did not finish reading within {limits.seconds:.1f} s"
    finally:  # whatever ended the read (a limit, KeyboardInterrupt, MemoryError), the child ends with it
        ended = _reap(pid, proc, kill=not done)
    if why == "":
        raise BoundExceeded(f"reading it {f'was stopped by {ended}' if ended else 'ended without a result'} "
                            f"(limits: {limits.seconds:.1f} s, {limits.memory >> 20:,} MiB more memory)")
    if why is not None:
        raise BoundExceeded(why)
    return status, storages


class _Over(Exception):
    pass


class _Pipe:
    """Exact reads from a pipe before a deadline (TimeoutError after it, EOFError when the writer is gone)."""

    def __init__(self, fd: int, deadline: float):
        self.fd, self.deadline = fd, deadline

    def read(self, n: int) -> bytearray:
        buffer = bytearray(n)
        view, done = memoryview(buffer), 0
        while done < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not select.select([self.fd], [], [], left)[0]:
                continue
            got = os.readv(self.fd, [view[done:]])
            if not got:
                raise EOFError
            done += got
        return buffer


def _reap(pid: int, proc, *, kill: bool) -> str:
    """Wait for the child (after SIGKILL when `kill`); a few words on how it ended if not normally."""
    if proc is not None:
        if kill:
            proc.kill()
        code = proc.wait()
        return f"exit code {code}" if code else ""
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):  # reaped by the caller's own SIGCHLD handling
        return ""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {signal.SIGXCPU: "its CPU-time limit", signal.SIGKILL: "a kill"}.get(sig, f"signal {sig}")
    return f"exit code {os.WEXITSTATUS(status)}" if os.WEXITSTATUS(status) else ""


def _main(argv: list) -> None:  # pragma: no cover - run by _spawned in a fresh interpreter
    import importlib

    module, _, name = argv[0].partition(":")
    reader = getattr(importlib.import_module(module), name)
    _limit_child(Limits(float(argv[2]), int(argv[3])))
    _child_send(reader, Path(argv[1]), sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
