"""A checkpoint's pickles, read without running them.

scan_pickles parses a file's pickles (pickletools only parses) for the globals they name and for what would
make loading them unbounded (huge tuples, bytearrays, calls of bytes with a size, codecs other than latin1,
tensors rebuilt with attributes); unsafe_names says which globals neither torch nor the numpy list allows.
The load itself is inert.py's.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .archives import archive_hazard, directory_problem


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
    # An empty array's data is `bytes()` in a protocol-2 pickle; the scan refuses any other call of bytes
    # (whose argument would be a size the file states).
    allowed.append((bytes, "builtins.bytes"))
    return allowed


def unsafe_names(names) -> list[str]:
    """The names among `names` that neither torch nor the numpy list allows, sorted."""
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _numpy_safe_globals()}
    allowed |= _torch_allowed_globals()
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


# A tuple whose elements are memo references to one tuple, nested N deep, is 2^N entries to hash: a dict
# keyed by it (or torch's unpickler building it) would not finish. No checkpoint needs tuples this large.
MAX_TUPLE_ENTRIES = 1 << 20
# The codecs protocol-2 pickles name for bytes (`_codecs.encode(text, "latin1")`); torch allows
# `_codecs.encode` under any codec, and some (punycode) take quadratic time.
PLAIN_CODECS = ("latin1", "latin-1")
# torch's allowed rebuilders that set attributes chosen by the file on a tensor (`numel = ...` would hide
# its size): plain tensors and parameters never need them.
STATEFUL_REBUILDS = ("torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_parameter_with_state")
try:  # how torch's unpickler maps Python 2 names (the scan must name what torch will look up)
    from torch._utils import IMPORT_MAPPING as _IMPORT_MAPPING
    from torch._utils import NAME_MAPPING as _NAME_MAPPING
except ImportError:  # pragma: no cover - an older torch: Python's own table
    from _compat_pickle import IMPORT_MAPPING as _IMPORT_MAPPING
    from _compat_pickle import NAME_MAPPING as _NAME_MAPPING
# The legacy (non-zip) torch format is five pickles (magic number, protocol, system info, the object, the
# storage keys) followed by raw storage bytes, which are not read as opcodes.
LEGACY_PICKLES = 5


@dataclass
class PickleScan:
    """What a file's pickles hold, found by parsing only: the globals they name, in order, and why loading
    them would be unbounded (a sentence fragment), or None."""

    globals: list = field(default_factory=list)
    hazard: Optional[str] = None
    protocol: int = 0  # the highest PROTO declared


@dataclass
class _Value:
    """The scanner's model of one stack entry: its logical size (memo references counted as often as used),
    the text of a string, the name of a global, the texts of a short tuple's items."""

    size: int = 1
    text: Optional[str] = None
    name: Optional[str] = None
    items: Optional[tuple] = None


_MARK = None
_PLAIN = _Value()  # one entry of size 1 that names nothing (never changed: shared by every such push)
_BYTEARRAY = "builds a bytearray, whose size the file states, not its contents; no checkpoint holds one"


def scan_pickles(path: Path) -> PickleScan:
    """Parse (pickletools only parses, it never builds objects) the pickles of a file — a zip checkpoint's
    .pkl records, or a raw file's first LEGACY_PICKLES pickles — modelling each opcode's stack effect."""
    scan = PickleScan()
    try:
        if zipfile.is_zipfile(path):
            scan.hazard = directory_problem(path)  # (the directory is parsed only when its size allows)
            if scan.hazard is not None:
                return scan
            with zipfile.ZipFile(path) as archive:
                # Two members of one name would let the scan read other bytes than torch's reader loads.
                scan.hazard = archive_hazard(archive.infolist())
                if scan.hazard is not None:
                    return scan
                blobs = [(archive.read(n), 1) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            blobs = [(path.read_bytes(), LEGACY_PICKLES)]
    except Exception:
        return scan  # unreadable: the loader says so
    for blob, count in blobs:
        stream = io.BytesIO(blob)
        for _ in range(count):
            if stream.tell() >= len(blob) or scan.hazard is not None:
                break
            try:
                _scan_one(stream, scan)
            except UnicodeDecodeError:
                scan.hazard = "names a global that is not a Python name (it holds bytes no module or class name has)"
            except Exception as err:  # what pickletools cannot parse is not handed to torch's unpickler either
                scan.hazard = f"holds a pickle that does not parse ({type(err).__name__}: {str(err)[:200]})"
    if scan.hazard is None and any(name in STATEFUL_REBUILDS for name in scan.globals):
        scan.hazard = "rebuilds a tensor with attributes chosen by the file, which no checkpoint needs"
    return scan


def _global_name(arg: str) -> str:
    """A GLOBAL's "module name" as torch's unpickler resolves it (Python 2 spellings mapped: __builtin__.set
    is builtins.set)."""
    module, _, name = str(arg).partition(" ")
    if (module, name) in _NAME_MAPPING:
        module, name = _NAME_MAPPING[(module, name)]
    elif module in _IMPORT_MAPPING:
        module = _IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _scan_one(stream, scan: PickleScan) -> None:
    stack: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "STACK_GLOBAL":
            if name == "GLOBAL":
                found = _global_name(arg)
            else:
                short, module = stack.pop(), stack.pop()
                found = f"{module.text}.{short.text}"
            scan.globals.append(found)
            if found.rsplit(".", 1)[-1] == "bytearray":
                scan.hazard = _BYTEARRAY
                return
            stack.append(_Value(name=found))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"):
            if name == "TUPLE":
                at = len(stack) - 1 - stack[::-1].index(_MARK)
                items, stack[at:] = stack[at + 1 :], []
            else:
                n = 0 if name == "EMPTY_TUPLE" else int(name[-1])
                items = stack[len(stack) - n :] if n else []
                del stack[len(stack) - n :]
            size = 1 + sum(v.size for v in items)
            if size > MAX_TUPLE_ENTRIES:
                scan.hazard = (f"builds a tuple of {size:,} entries or more out of repeated references, which would "
                               f"take unbounded time to read; no checkpoint holds one")
                return
            stack.append(_Value(size=size, items=tuple(v.text for v in items) if len(items) <= 4 else None))
        elif name in ("REDUCE", "NEWOBJ"):
            args, fn = stack.pop(), stack.pop()
            if fn.name == "builtins.bytes" and args.items != ():
                scan.hazard = "calls bytes(...) with arguments (a size the file states); numpy writes only bytes()"
                return
            if fn.name == "_codecs.encode" and (args.items is None or len(args.items) != 2
                                                or args.items[1] not in PLAIN_CODECS):
                codec = args.items[1] if args.items and len(args.items) == 2 and args.items[1] else "?"
                scan.hazard = (f"decodes text with the codec {codec[:40]!r}; torch writes only latin1, and other "
                               f"codecs can take quadratic time")
                return
            stack.append(_PLAIN)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _PLAIN))
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "PROTO":
            scan.protocol = max(scan.protocol, int(arg))
        elif name == "BYTEARRAY8":
            scan.hazard = _BYTEARRAY
            return
        else:
            before = op.stack_before
            if pickletools.markobject in before:  # pops to the mark, and the mark
                at = len(stack) - 1 - stack[::-1].index(_MARK)
                del stack[at:]
                before = before[: before.index(pickletools.markobject)]
            if before:
                del stack[len(stack) - len(before) :]
            is_text = isinstance(arg, str) and ("UNICODE" in name or "STRING" in name)
            stack.extend([_Value(text=arg)] if is_text else [_PLAIN] * len(op.stack_after))
