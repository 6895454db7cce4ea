"""An untrusted file is read in a child process under a wall-clock and a memory limit; only plain data
comes back.

Why: torch's weights-only unpickler runs no code a file names, but a small file can still make it (or what
reads its result) spend unbounded time or memory — a quadratic codec, a huge tuple hashed again and
again, a tensor whose view declares 2^36 entries. Refusing each trick as it is found is not a bound. So:

    parent ── fork ──► child: address-space limit = its size at the fork + `memory` bytes (within the
       │                       caller's own limit: limits.py), CPU-time limit, torch on one thread; runs
       │                       `reader(path)` (the inert load, inert.py), then
       │                       encodes the result as plain data (wire.py) and writes it to a pipe
       └── waits at most `seconds`, reads at most `memory` bytes, kills the child otherwise

The forked child runs only the reader: no CUDA (the load maps every storage to the CPU; a CUDA call after
a fork raises instead of hanging), no lock another thread held at the fork (the reader takes none; and if
it ever waited on one, the wall clock ends it: the bound never depends on the child behaving). Where
there is no fork (Windows), or `FUSEDVQ_LOAD_ISOLATION=spawn`, a fresh interpreter is started instead
(`python -m fusedvq.checkpoint.isolation`, slower: it imports torch) under the same wall clock, and under
the memory limit where the `resource` module exists; it sends its result through a pipe of its own, so
that what the interpreter prints as it starts is never read as one. A child that ends otherwise is said to
have been stopped by its CPU-time limit, its memory limit or a signal, in words.

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
from pathlib import Path
from typing import Any, Callable

import torch

from .limits import Limits, isolation, limit_child
from .wire import ResultDecoder, ResultEncoder

OUT_OF_MEMORY = 3  # the exit code of a child that ran out of memory outside the reader (status unsent)
# What torch's CPU allocator raises (as RuntimeError) when the address-space limit refuses it memory.
_OUT_OF_MEMORY_TEXTS = ("can't allocate memory", "not enough memory", "bad_alloc")


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
    Raises ChildRefused (the reader's own exception, as kind and text), BoundExceeded, or CheckpointError for
    a FUSEDVQ_LOAD_ISOLATION it does not accept."""
    if isolation() == "fork":
        status, storages = _forked(reader, path, limits)
    else:
        status, storages = _spawned(reader, path, limits)
    if status[0] != "ok":
        if status[1] == "MemoryError":
            raise BoundExceeded(f"it ran out of memory under its limits ({limits.words()})")
        if status[1] == "LimitError":
            raise BoundExceeded(f"the child that reads it could not set its limits ({status[2]})")
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
        status = ("error", "MemoryError", "")
    except BaseException as err:  # noqa: BLE001 - everything goes back as text
        if isinstance(err, RuntimeError) and any(why in str(err)[:4000] for why in _OUT_OF_MEMORY_TEXTS):
            status = ("error", "MemoryError", "")
        else:
            problems = getattr(err, "problems", None)
            problems = [str(p)[:4000] for p in problems[:64]] if isinstance(problems, list) else None
            status = ("error", type(err).__name__, str(err)[:4000], problems)
    _write(fd, status, storages)


def _write(fd: int, status: tuple, storages: list) -> None:
    blob = marshal.dumps(status)
    for chunk in (len(blob).to_bytes(8, "little"), blob, *storages):
        view = memoryview(chunk).cast("B")
        while view:
            view = view[os.write(fd, view):]


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
            code = _child_run(reader, path, limits, write_end)
        except MemoryError:
            code = OUT_OF_MEMORY
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        return _receive(read_end, limits, pid=pid)
    finally:
        os.close(read_end)


def _child_run(reader, path: Path, limits: Limits, fd: int) -> int:
    """The child's work: its limits set (or the reason they could not be, sent back), then the read."""
    try:
        limit_child(limits)
    except (ValueError, OSError) as err:
        _write(fd, ("error", "LimitError", f"{type(err).__name__}: {err}"), [])
        return 0
    _child_send(reader, path, fd)
    return 0


def _spawned(reader, path: Path, limits: Limits):
    """The fallback without fork: a fresh interpreter runs the same child code (python -m
    fusedvq.checkpoint.isolation). The result comes back through a pipe of its own, not stdout: whatever the
    interpreter prints as it starts (a sitecustomize, a debugger hook) is not read as the result."""
    target = f"{reader.__module__}:{reader.__qualname__}"
    read_end, write_end = os.pipe() if os.name == "posix" else (None, None)
    command = [sys.executable, "-m", "fusedvq.checkpoint.isolation", target, os.fspath(path), repr(limits.seconds),
               str(limits.memory), str(write_end if write_end is not None else 1)]
    if write_end is not None:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=(write_end,))
        os.close(write_end)
    else:  # pragma: no cover - Windows: stdout it is
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        read_end = proc.stdout.fileno()
    try:
        # Starting Python and importing torch is not the file's doing: it gets its own minute.
        return _receive(read_end, Limits(limits.seconds + 60.0, limits.memory, limits.requested), proc=proc)
    finally:
        if write_end is not None:
            os.close(read_end)
        else:  # pragma: no cover
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
            raise _Over(f"what it holds exceeds the memory a file of its size may fill ({limits.words()})")
        status = marshal.loads(pipe.read(size))
        storages = []
        if status[0] == "ok":
            if sum(status[2]) > limits.memory:
                raise _Over(f"its tensors exceed the memory a file of its size may fill ({limits.words()})")
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
                            f"(limits: {limits.words()})")
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
        return _ending(-code if code < 0 else None, code if code > 0 else 0)
    try:
        if kill:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):  # reaped by the caller's own SIGCHLD handling
        return ""
    if os.WIFSIGNALED(status):
        return _ending(os.WTERMSIG(status), 0)
    return _ending(None, os.WEXITSTATUS(status))


def _ending(sig, code: int) -> str:
    """How a child ended, in words ("" for a normal end)."""
    if sig is not None:
        return {signal.SIGXCPU: "its CPU-time limit",
                signal.SIGKILL: "a kill (its CPU-time limit's hard end, or the system running out of memory)"}.get(
                    sig, f"signal {sig}")
    if code == OUT_OF_MEMORY:
        return "its memory limit (it ran out of memory)"
    return f"exit code {code}" if code else ""


def _main(argv: list) -> None:  # pragma: no cover - run by _spawned in a fresh interpreter
    import importlib

    module, _, name = argv[0].partition(":")
    fd = int(argv[4])
    if fd == 1:  # (Windows: the result goes to stdout; what the reader prints goes to stderr instead)
        fd, sys.stdout = os.dup(1), sys.stderr
    reader = getattr(importlib.import_module(module), name)
    try:
        code = _child_run(reader, Path(argv[1]), Limits(float(argv[2]), int(argv[3])), fd)
    except MemoryError:
        code = OUT_OF_MEMORY
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
