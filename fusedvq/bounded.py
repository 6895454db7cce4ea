"""An untrusted file is read in a child process under a wall-clock and a memory limit; only plain data
comes back.

Why: torch's weights-only unpickler runs no code a file names, but a small file can still make it (or what
reads its result) spend unbounded time or memory — a quadratic codec, a huge tuple hashed again and
again, a tensor whose view declares 2^36 entries. Refusing each trick as it is found is not a bound. So:

    parent ── fork ──► child: address-space limit = its size at the fork + `memory` bytes, CPU-time limit,
       │                       torch on one thread; runs `reader(path)` (safe_load's inert load), then
       │                       encodes the result as plain data (below) and writes it to a pipe
       └── waits at most `seconds`, reads at most `memory` bytes, kills the child otherwise

The forked child runs only the reader: no CUDA (the load maps every storage to the CPU; a CUDA call after
a fork raises instead of hanging), no lock another thread held at the fork (the reader takes none; and if
it ever waited on one, the wall clock ends it: the bound never depends on the child behaving). Where
there is no fork (Windows), or `FUSEDVQ_LOAD_ISOLATION=spawn`, a fresh interpreter is started instead
(`python -m fusedvq.bounded`, slower: it imports torch) under the same wall clock, and under the memory
limit where the `resource` module exists.

What comes back: dicts (keys that are str, int, float, bool or None), lists, tuples, numbers, strings,
bytes, numpy arrays and scalars of plain dtypes, tensors (their storage bytes and view geometry, rebuilt
as plain tensors: no subclass, no attribute a file set), torch dtypes and devices, and the records of
foreign objects (foreign.py), shared and cyclic references kept as such. Anything else becomes a record
naming its type. At most MAX_NODES objects and references, MAX_DEPTH levels: a file past that is refused.
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

import numpy as np
import torch

from .foreign import ForeignObject, stand_in_class

MAX_NODES = 2_000_000  # objects and references in the read result
MAX_DEPTH = 200  # nesting levels


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
    return _Decoder(storages).value(status[1])


# ---------------------------------------------------------------------------------------------------
# The child: run the reader, encode its result as plain data
# ---------------------------------------------------------------------------------------------------


def _child_send(reader: Callable[[Path], Any], path: Path, fd: int) -> None:
    """Run the reader and write its result to `fd`: the length of the marshalled tree (8 bytes), the tree
    (("ok", tree, storage sizes) or ("error", kind, text, problems)), then each storage's bytes."""
    storages: list = []
    try:
        torch.set_num_threads(1)  # nothing here is worth a thread pool, and a forked one may be broken
        encoder = _Encoder()
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


class _Encoder:
    """A read result → nested tuples of plain values (what marshal writes): ("d", ref, [(key, node)]),
    ("l", ref, [node]), ("t", ref, [node]), ("f", ref, class name, args, state) for records, ("r", ref) for
    a container met before, ("a", descr, shape, bytes) for arrays and numpy scalars, ("x", storage, dtype,
    shape, stride, offset, requires_grad) for tensors (each storage sent once), ("o", type name) else."""

    def __init__(self):
        self.nodes = 0
        self.storages: list[np.ndarray] = []  # uint8 views of the tensors' storages (no copy)
        self._storage_ids: dict = {}
        self._seen: dict = {}  # id(container) → its reference number

    def node(self, obj: Any, depth: int):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"it holds more than {MAX_NODES:,} objects and references; no checkpoint needs that many")
        if depth > MAX_DEPTH:
            raise ValueError(f"its objects are nested more than {MAX_DEPTH} levels deep")
        if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
            return obj
        # An object met again is sent as a reference to its first encoding: shared structure stays shared
        # (readers of the result size shared lists once), and a cycle ends.
        if id(obj) in self._seen:
            return ("r", self._seen[id(obj)])
        self._seen[id(obj)] = len(self._seen)
        ref = self._seen[id(obj)]
        if isinstance(obj, dict):
            return ("d", ref, [(k, self.node(v, depth + 1)) for k, v in obj.items() if _plain_key(k)])
        if isinstance(obj, (list, tuple)):
            return ("l" if isinstance(obj, list) else "t", ref, [self.node(v, depth + 1) for v in obj])
        if isinstance(obj, (set, frozenset)):
            return ("s", [v for v in obj if _plain_key(v)])
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise ValueError("it holds a numpy array of dtype object")
            return ("a", np.lib.format.dtype_to_descr(obj.dtype), obj.shape, np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, np.generic):
            return ("a", np.lib.format.dtype_to_descr(obj.dtype), None, obj.tobytes())
        if isinstance(obj, ForeignObject):
            return ("f", ref, obj.class_name, self.node(obj.args, depth + 1), self.node(obj.state, depth + 1))
        if isinstance(obj, (torch.dtype, torch.device)):
            return ("y" if isinstance(obj, torch.dtype) else "v", str(obj))
        return ("o", f"{type(obj).__module__}.{type(obj).__qualname__}")

    def _tensor(self, t: torch.Tensor):
        # Methods through the class: a file can set attributes on the instance (numel = ...) that shadow them.
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.__dict__:
            raise ValueError("it holds a tensor rebuilt with a subclass or with attributes set by the file")
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise ValueError(f"it holds a tensor of layout {t.layout} on {t.device}, not a plain CPU tensor")
        storage = torch.Tensor.untyped_storage(t)
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._storage_ids:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._storage_ids[key] = len(self.storages)
            self.storages.append(raw.numpy())
        return ("x", self._storage_ids[key], str(t.dtype).removeprefix("torch."), tuple(torch.Tensor.size(t)),
                tuple(torch.Tensor.stride(t)), int(torch.Tensor.storage_offset(t)), bool(t.requires_grad))


def _plain_key(key: Any) -> bool:
    return key is None or type(key) in (bool, int, float, str, bytes)


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
    """The fallback without fork: a fresh interpreter runs the same child code (python -m fusedvq.bounded)."""
    target = f"{reader.__module__}:{reader.__qualname__}"
    command = [sys.executable, "-m", "fusedvq.bounded", target, os.fspath(path), repr(limits.seconds),
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
    why = None
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
    except _Over as over:
        why = str(over)
    except EOFError:
        why = ""
    except TimeoutError:
        why = f"it did not finish reading within {limits.seconds:.1f} s"
    finally:
        ended = _reap(pid, proc, kill=why is not None)
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
    if kill:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {signal.SIGXCPU: "its CPU-time limit", signal.SIGKILL: "a kill"}.get(sig, f"signal {sig}")
    return f"exit code {os.WEXITSTATUS(status)}" if os.WEXITSTATUS(status) else ""


class _Decoder:
    """Plain data → the objects a reader returned (tensors rebuilt over the storages read from the pipe)."""

    def __init__(self, storages: list):
        self.storages = storages
        self._rebuilt: dict = {}
        self._classes: dict = {}
        self._refs: dict = {}

    def value(self, node):
        if type(node) is not tuple:
            return node
        tag = node[0]
        if tag == "r":
            return self._refs.get(node[1])  # (None only for a tuple that holds itself through a list)
        if tag == "d":
            out = self._refs[node[1]] = {}
            out.update((k, self.value(v)) for k, v in node[2])
            return out
        if tag == "l":
            out = self._refs[node[1]] = []
            out.extend(self.value(v) for v in node[2])
            return out
        if tag == "t":
            out = self._refs[node[1]] = tuple(self.value(v) for v in node[2])
            return out
        if tag == "s":
            return set(node[1])
        if tag == "a":
            array = np.frombuffer(node[3], dtype=np.lib.format.descr_to_dtype(node[1]))
            return array[0] if node[2] is None else array.reshape(node[2]).copy()
        if tag == "x":
            return self._tensor(*node[1:])
        if tag == "f":
            cls = self._classes.get(node[2]) or self._classes.setdefault(node[2], stand_in_class(node[2]))
            record = self._refs[node[1]] = ForeignObject.__new__(cls)
            args = self.value(node[3])
            record.args = args if isinstance(args, tuple) else ()
            record.__setstate__(self.value(node[4]))
            return record
        if tag == "y":
            return getattr(torch, node[1].removeprefix("torch."))
        if tag == "v":
            return torch.device(node[1])
        cls = self._classes.get(node[1]) or self._classes.setdefault(node[1], stand_in_class(node[1]))
        return ForeignObject.__new__(cls)  # ("o", type name): an object of a type not carried back

    def _tensor(self, index, dtype, shape, stride, offset, requires_grad):
        if index not in self._rebuilt:
            data = self.storages[index]  # a bytearray of its own: the tensors keep it alive
            self._rebuilt[index] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        kind = getattr(torch, dtype)
        storage = self._rebuilt[index].untyped_storage()
        tensor = torch.empty(0, dtype=kind).set_(storage, offset, shape, stride)
        return tensor.requires_grad_() if requires_grad and tensor.is_floating_point() else tensor


def _main(argv: list) -> None:  # pragma: no cover - run by _spawned in a fresh interpreter
    import importlib

    module, _, name = argv[0].partition(":")
    reader = getattr(importlib.import_module(module), name)
    _limit_child(Limits(float(argv[2]), int(argv[3])))
    _child_send(reader, Path(argv[1]), sys.stdout.fileno())


if __name__ == "__main__":  # pragma: no cover
    _main(sys.argv[1:])
