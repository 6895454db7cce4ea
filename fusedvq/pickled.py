"""What a pickle references, found without running it: the numpy types a weights-only load allows, and the
globals (classes, callables) a refused file names, read from its opcodes (pickletools only parses) or, for
zip checkpoints, by torch.serialization.get_unsafe_globals_in_checkpoint. safe_load.py uses them."""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch


def _numpy_safe_globals() -> list:
    """The numpy callables and types a checkpoint with numpy arrays, scalars and dtypes needs."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: list = [np.ndarray, np.dtype]
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        # Files written under numpy 1.x name the module numpy.core; under 2.x numpy._core.
        allowed += [(fn, f"numpy._core.multiarray.{name}"), (fn, f"numpy.core.multiarray.{name}")]
    # bool, ints, uints, floats, complex, str, bytes, datetime, timedelta; never object ('O'), whose
    # elements would be arbitrary pickled objects.
    codes = "?bhilqBHILQefdgFDGUSMm"
    allowed += sorted({type(np.dtype(c)) for c in codes}, key=str)  # dtype classes, for BUILD
    allowed += sorted({np.dtype(c).type for c in codes}, key=str)  # scalar types (np.float32, ...)
    return allowed


def _pickled_globals(path: Path, error: Optional[BaseException] = None) -> list[str]:
    """Names of the globals a file references that neither torch nor the numpy list allows, found without
    running any of it: from a zip checkpoint's records, a raw pickle's opcodes, and the loader's error."""
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _numpy_safe_globals()}
    allowed |= _torch_allowed_globals()
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            names = []
    else:
        names = _raw_pickle_globals(path)
    if error is not None:
        names += re.findall(r"GLOBAL ([\w.]+)", str(error))
    found = {n for n in names if n not in allowed}
    # The error text names builtins without their module ("getattr"); keep the qualified spelling.
    return sorted(n for n in found if "." in n or not any(m.endswith("." + n) for m in found))


def _torch_allowed_globals() -> set[str]:
    """Names torch.load(weights_only=True) accepts by itself (collections.OrderedDict, torch.Size, ...):
    never named as the cause of a refusal."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # pragma: no cover - a torch without the private helper: name everything found
        return set()


def _raw_pickle_globals(path: Path) -> list[str]:
    """Globals named by a raw pickle's opcodes; pickletools only parses, it never builds objects.

    A small model of the stack and memo recovers the module and name strings STACK_GLOBAL consumes
    (protocol 4+). The legacy torch format starts with other pickles, so its globals come from the
    loader's error message instead.
    """
    names: list[str] = []
    stack: list = []  # strings as pushed, None for anything else
    memo: dict = {}
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(stack) >= 2:
                    names.append(f"{stack[-2]}.{stack[-1]}")
                if op.name == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1] if stack else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg))
                else:
                    is_text = "UNICODE" in op.name or "STRING" in op.name
                    stack.append(arg if is_text and isinstance(arg, str) else None)
    except Exception:
        pass  # not a pickle, or truncated: whatever was found so far
    return names


# A tuple whose elements are memo references to one tuple, nested N deep, is 2^N entries to hash: a dict
# keyed by it (or torch's unpickler building it) would not finish. No checkpoint needs tuples this large.
MAX_TUPLE_ENTRIES = 1 << 20


def oversized_tuple(path: Path) -> Optional[str]:
    """What would make the load unbounded, in words, or None: a tuple over MAX_TUPLE_ENTRIES logical entries
    (memo references counted as often as they are used), or a bytearray (torch allows it; its size is a
    number in the file). Parses only (pickletools), modelling
    each opcode's stack effect; a zip checkpoint's data.pkl records are read, a raw file's pickles in turn."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                blobs = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
        else:
            blobs = [path.read_bytes()]
    except Exception:
        return None
    for blob in blobs:
        found = _scan_tuples(blob)
        if found is not None:
            return found
    return None


def _hazard(size: int) -> str:
    return (f"builds a tuple of {size:,} entries or more out of repeated references, which would take unbounded "
            f"time to read")


def _scan_tuples(blob: bytes) -> Optional[str]:
    import io

    stream = io.BytesIO(blob)
    while stream.tell() < len(blob):
        stack: list = []  # logical sizes; None = a MARK
        memo: dict = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                    if name == "TUPLE":
                        at = len(stack) - 1 - stack[::-1].index(None)
                        items, stack = stack[at + 1 :], stack[:at]
                    else:
                        n = int(name[-1])
                        items, stack = stack[len(stack) - n :], stack[: len(stack) - n]
                    size = 1 + sum(items)
                    if size > MAX_TUPLE_ENTRIES:
                        return _hazard(size)
                    stack.append(size)
                elif name == "MEMOIZE":
                    memo[len(memo)] = stack[-1]
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg, 1))
                elif name == "MARK":
                    stack.append(None)
                elif name == "GLOBAL" and str(arg).split(" ")[-1] == "bytearray":
                    return "builds a bytearray, whose size the file states, not its contents"
                else:
                    before = op.stack_before
                    if pickletools.markobject in before:  # pops to the mark, and the mark
                        at = len(stack) - 1 - stack[::-1].index(None)
                        stack = stack[:at]
                        before = before[: before.index(pickletools.markobject)]
                    if before:
                        stack = stack[: len(stack) - len(before)]
                    stack.extend(1 for _ in op.stack_after)
        except Exception:
            return None  # not a pickle (or a malformed one): the loader says so
    return None
