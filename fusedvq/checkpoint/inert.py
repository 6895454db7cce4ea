"""The inert load, run in the bounded child (isolation.py, started by reading.py): a checkpoint read without
running anything stored in it.

_inert_load refuses what the scan (pickles.py) finds, then loads the file with `torch.load(weights_only=True)`,
the numpy types such files contain and, for the classes a trainer pickles of its own, inert stand-ins
(records.py); a global no stand-in is made for (a function, a builtin, os, ...) and a call of a stand-in class
are refused, naming them, before any of it runs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError, _brief
from .pickles import _numpy_safe_globals, scan_pickles, unsafe_names
from .records import ForeignCallRefused, refusal, stand_ins


def _pickled_globals(path: Path, error: Optional[BaseException] = None) -> list[str]:
    """Names of the globals a file references that neither torch nor the numpy list allows, found without
    running any of it (scan_pickles), and those the loader's error names."""
    names = list(scan_pickles(path).globals)
    if error is not None:
        names += re.findall(r"GLOBAL ([\w.]+)", str(error))
    return unsafe_names(names)



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
    if all("does not build either" in why for why in reasons):
        return CheckpointError([f"{file} was not loaded: it holds objects torch's safe loader does not read ({shown}): "
                                f"save lists, tuples or sets where it is written, or pass trust=True (CLI: --trust) if "
                                f"you trust the file's source"])
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
