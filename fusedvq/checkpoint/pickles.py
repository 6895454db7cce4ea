"""A checkpoint's pickles, read without running them.

scan_pickles parses a file's pickles (pickletools only parses) for the globals they name and for what would
make loading them unbounded (huge tuples, bytearrays, codecs other than latin1, tensors rebuilt with
attributes). _inert_load, which runs in the bounded child (isolation.py, started by reading.py), refuses
what the scan finds, then loads the file with `torch.load(weights_only=True)`, the numpy types such files
contain and, for the classes a trainer pickles of its own, inert stand-ins (records.py); a global no
stand-in is made for (a function, a builtin, os, ...) and a call of a stand-in class are refused, naming
them, before any of it runs.
"""

from __future__ import annotations

import io
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import CheckpointError, _brief
from .records import ForeignCallRefused, refusal, stand_ins


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
    running any of it (scan_pickles), and those the loader's error names."""
    names = list(scan_pickles(path).globals)
    if error is not None:
        names += re.findall(r"GLOBAL ([\w.]+)", str(error))
    return unsafe_names(names)


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
_BYTEARRAY = "builds a bytearray, whose size the file states, not its contents; no checkpoint holds one"


def scan_pickles(path: Path) -> PickleScan:
    """Parse (pickletools only parses, it never builds objects) the pickles of a file — a zip checkpoint's
    .pkl records, or a raw file's first LEGACY_PICKLES pickles — modelling each opcode's stack effect."""
    scan = PickleScan()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
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


def _scan_one(stream, scan: PickleScan) -> None:
    stack: list = []
    memo: dict = {}
    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name == "GLOBAL" or name == "STACK_GLOBAL":
            if name == "GLOBAL":
                found = str(arg).replace(" ", ".")
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
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if fn.name == "_codecs.encode" and (args.items is None or len(args.items) != 2
                                                or args.items[1] not in PLAIN_CODECS):
                codec = args.items[1] if args.items and len(args.items) == 2 and args.items[1] else "?"
                scan.hazard = (f"decodes text with the codec {codec[:40]!r}; torch writes only latin1, and other "
                               f"codecs can take quadratic time")
                return
            stack.append(_Value())
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _Value()))
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
            stack.extend(_Value(text=arg if is_text else None) for _ in op.stack_after)


# ---------------------------------------------------------------------------------------------------
# The inert load (run in the bounded child)
# ---------------------------------------------------------------------------------------------------

# A legacy-format file may name globals the scan missed one refusal at a time; more rounds than this is not
# a checkpoint. A file naming more foreign classes than MAX_FOREIGN_NAMES is not one either (each name is a
# stand-in torch's allow-list checks on every object).
_MAX_LOAD_ROUNDS = 8
MAX_FOREIGN_NAMES = 64


def _inert_load(file: Path):
    """torch.load(weights_only=True) with numpy's types and, for each foreign class the file names, a
    stand-in that reads its objects as records (records.py). Refuses, naming them, the globals no stand-in
    is made for, a file that calls a stand-in class, and what scan_pickles finds unbounded; nothing stored
    in the file runs. Runs in the bounded child (reading._load_inertly)."""
    scan = scan_pickles(file)
    if scan.hazard is not None:
        raise CheckpointError([f"{file} was not loaded: it {scan.hazard}"])
    names = set(unsafe_names(scan.globals))
    for _ in range(_MAX_LOAD_ROUNDS):
        if any("ObjectDType" in name for name in names):
            raise _object_arrays(file)
        refused = [why for why in map(refusal, sorted(names)) if why]
        if refused:
            raise _refused(file, refused)
        if len(names) > MAX_FOREIGN_NAMES:
            raise CheckpointError([
                f"{file} was not loaded: it names {len(names):,} classes fusedvq does not have, more than the "
                f"{MAX_FOREIGN_NAMES} a checkpoint's own records need; if you trust the file's source, pass "
                f"trust=True (CLI: --trust)"
            ])
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals() + stand_ins(names)):
                warnings.simplefilter("ignore")  # torch's notes about pickle protocols are noise here
                return torch.load(file, map_location="cpu", weights_only=True)
        except ForeignCallRefused as err:
            raise CheckpointError([
                f"{file} was not loaded: {err}; classes fusedvq does not have are read only as records of "
                f"their state. If you trust the file's source, pass trust=True (CLI: --trust)"
            ]) from None
        except Exception as err:
            if "ObjectDType" in str(err):
                raise _object_arrays(file) from None
            protocol_error = _unreadable_protocol(file, err, scan)
            if protocol_error is not None:
                raise protocol_error from None
            more = set(_pickled_globals(file, err)) - names
            if not more:
                raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({_brief(err)})"]) from None
            names |= more
    raise CheckpointError([f"{file} could not be read: it names more than {_MAX_LOAD_ROUNDS} rounds of objects"])


def _object_arrays(file: Path) -> CheckpointError:
    return CheckpointError([
        f"{file} was not loaded: it holds a numpy array of dtype object, whose elements are arbitrary pickled "
        f"Python objects that could run code when loaded; save numeric arrays instead, or pass trust=True "
        f"(CLI: --trust) if you trust the file's source"
    ])


def _refused(file: Path, reasons: list[str]) -> CheckpointError:
    shown = "; ".join(reasons[:5]) + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
    return CheckpointError([
        f"{file} was not loaded: it contains pickled Python objects that could run code when loaded ({shown}). "
        f"Tensors, numbers, strings, containers, numpy arrays, paths and records of other classes' state are "
        f"read by default; if you trust the file's source, pass trust=True (CLI: --trust)"
    ])


_RESAVE = ("re-save it with torch.save's defaults (torch.save(torch.load(path, weights_only=False), path)) where "
           "you trust it, or pass trust=True (CLI: --trust) if you trust the file's source")


def _unreadable_protocol(file: Path, err: BaseException, scan) -> Optional[CheckpointError]:
    """The error for a pickle whose protocol torch's safe loader does not read (4 and 5: FRAME, ...)."""
    if "Unsupported operand" not in str(err) or scan.protocol < 4:
        return None
    return CheckpointError([
        f"{file} was pickled with protocol {scan.protocol} (torch.save(..., pickle_protocol={scan.protocol})), "
        f"which torch's safe loader does not read (it reads protocols 2 and 3): " + _RESAVE
    ])
