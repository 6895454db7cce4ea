"""Reading a VQ-VAE checkpoint file: path → dict, without running code stored in it.

resolve_checkpoint finds the file (a folder's best_model.pt, ...); what can be told before anything is
unpickled is checked first (a FIFO or device is never opened; an empty file, a format no safe loader reads, a
zip directory longer than any checkpoint's are refused with a sentence; archives.py). read_checkpoint
then loads it in a child process within time and memory limits (isolation.py) with the inert load
(pickles.py: `torch.load(weights_only=True)`, numpy's types, records for foreign classes); anything that
would run code is refused with a message naming it, before any of it runs. `trust=True` loads it with full
unpickling and warns. Statistics `.npz` files are read with `allow_pickle=False` (read_stats_file).
"""

from __future__ import annotations

import math
import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .errors import (
    CheckpointError, PathLike, UnsafeLoadWarning, _brief, _Problem, quoted, require_flag, require_path,
)
from .isolation import BoundExceeded, ChildRefused, read_bounded
from .limits import Limits
from .archives import MAX_STATS_BYTES, STATS_MEMBERS, archive_hazard, directory_problem
from .inert import _RESAVE, _inert_load
from .pickles import LEGACY_PICKLES

# Looked for, in this order, when a folder is given instead of a file (trainer layouts: the checkpoint
# folder itself, or the run folder with checkpoints/ below it).
CHECKPOINT_NAMES = ("best_model.pt", "final_model.pt", "checkpoints/best_model.pt", "checkpoints/final_model.pt")


def _not_regular(path: Path) -> Optional[str]:
    """Why `path` cannot be read as a file (a FIFO, a device, a socket), or None for a regular file.
    Opening a FIFO blocks until a writer comes: it must never be opened."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"it cannot be examined ({err.strerror or type(err).__name__})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"it is {kind}, not a regular file"


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint file for `path`: the file itself, or the checkpoint inside a folder."""
    path = require_path("path", path, "a checkpoint file or folder")
    if not path.exists():
        raise CheckpointError([f"no checkpoint at {path}: the path does not exist"])
    if not path.is_dir():
        why = _not_regular(path)
        if why:
            raise CheckpointError([f"{path} cannot be a checkpoint: {why}"])
        return path
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())
    # (is_file follows links and is true for regular files only: FIFOs and devices are never picked)
    if len(found) == 1:
        return found[0]
    if not found:
        stats = sorted(p.name for p in path.glob("normalization_stats*.npz") if p.is_file())
        if stats:
            raise CheckpointError([
                f"the folder {path} holds no checkpoint (no .pt or .pth file), only the statistics file "
                f"{stats[0]}{f' (and {len(stats) - 1} more)' if len(stats) > 1 else ''}; pass the VQ-VAE "
                f"checkpoint it was saved with"
            ])
        raise CheckpointError([f"the folder {path} holds no checkpoint (no .pt or .pth file)"])
    names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
    raise CheckpointError([
        f"the folder {path} holds {len(found)} checkpoints ({names}) and none is named best_model.pt or "
        f"final_model.pt: pass the file itself"
    ])


def read_checkpoint(path: PathLike, *, trust: bool = False) -> dict:
    """The checkpoint's dict, loaded on the CPU without running pickled code (unless trust=True).

    Raises CheckpointError with a sentence that says what is wrong (missing, unreadable, refused).
    """
    trust = require_flag("trust", trust)
    file = resolve_checkpoint(path)
    _check_checkpoint_file(file, trust)
    if trust:
        warnings.warn(
            f"loading {file} with trust=True: full unpickling can run arbitrary code stored in the file; "
            f"do this only for files from a source you trust",
            UnsafeLoadWarning,
            stacklevel=2,
        )
        try:
            data = torch.load(file, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as err:
            raise CheckpointError([
                f"{file} could not be loaded with trust=True: it pickles objects of the module {quoted(err.name)}, "
                f"which "
                f"is not installed; without trust=True they are read as records of their state instead"
            ]) from None
        except Exception as err:
            raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({_brief(err)})"]) from None
    else:
        data = _load_inertly(file)
    if not isinstance(data, Mapping):
        raise CheckpointError([f"{file} holds a {type(data).__name__}, not the dict a VQ-VAE trainer writes"])
    return dict(data)


def _load_inertly(file: Path):
    """The inert load (_inert_load) run in a child process within Limits.for_file (isolation.py): whatever the
    file makes torch's unpickler do, this ends in bounded time and memory, as a result or a CheckpointError."""
    size = file.stat().st_size
    limits = Limits.for_file(size)
    try:
        return read_bounded(_inert_load, file, limits)
    except ChildRefused as err:
        if err.problems:
            raise CheckpointError(err.problems) from None
        raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({err.kind}: {err})"]) from None
    except BoundExceeded as err:
        raise CheckpointError([
            f"{file} was not loaded: {err}; a checkpoint of {size:,} bytes reads in a fraction of that (the limits "
            f"grow with the file's size; FUSEDVQ_LOAD_SECONDS and FUSEDVQ_LOAD_MEMORY_MB set their base)"
        ]) from None


def _check_checkpoint_file(file: Path, trust: bool = False) -> None:
    """What can be told of a checkpoint before torch.load reads it: empty, not a checkpoint's format at
    all (or one only a full unpickling reads), or a zip archive whose records declare more than the file
    can hold."""
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint: it is empty (0 bytes)"])
    if zipfile.is_zipfile(file) and not _is_tar(file):  # (a tar that holds a zip ends like one)
        why = None if trust else directory_problem(file)  # (its members are checked in the bounded child)
        if why:
            raise CheckpointError([f"{file} was not loaded: it {why}"])
        return
    with open(file, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or trust:  # every pickle of protocol 2 or later, and the legacy torch format
        return
    if _is_tar(file):
        raise CheckpointError([
            f"{file} is a tar archive in torch's oldest checkpoint format, which only a full unpickling reads: "
            + _RESAVE
        ])
    protocol = _old_pickle_protocol(file)
    if protocol is not None:
        raise CheckpointError([
            f"{file} is a torch checkpoint pickled with protocol {protocol} (torch.save(..., "
            f"_use_new_zipfile_serialization=False, pickle_protocol={protocol})), which torch's safe loader does "
            f"not read: " + (_RESAVE if protocol == 1 else "torch.load cannot read it either (not even with "
                             "weights_only=False); re-save it with torch.save's defaults where it was written")
        ])
    raise CheckpointError([
        f"{file} could not be read as a PyTorch checkpoint: it is neither a zip archive (what torch.save "
        f"writes) nor a pickle (it starts with {head!r})"
    ])


def _is_tar(file: Path) -> bool:
    import tarfile

    try:
        return tarfile.is_tarfile(file)
    except OSError:
        return False


def _old_pickle_protocol(file: Path) -> Optional[int]:
    """0 or 1 when the file opens with whole pickles of that protocol (the legacy format's five; pickletools
    only parses), else None."""
    import pickletools

    highest, size = 0, file.stat().st_size
    try:
        with open(file, "rb") as f:
            for _ in range(LEGACY_PICKLES):
                for op, _, _ in pickletools.genops(f):
                    highest = max(highest, op.proto)
                if f.tell() >= size:
                    break
    except Exception:
        return None
    return highest if highest < 2 else None


_STATS_SUFFIXES = ("mean", "std", "median", "mad")


def _is_stats_key(key: str) -> bool:
    return key == "_normalization_method" or any(key == sfx or key.endswith("_" + sfx) for sfx in _STATS_SUFFIXES)


def _declared_beyond_held(archive: zipfile.ZipFile, keys: list) -> Optional[str]:
    """Why an array's .npy header is not believed (it declares more bytes than its member holds: numpy would
    allocate what it declares before reading), or None. Reads the headers only."""
    for key in keys:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
        declared = math.prod(shape) * dtype.itemsize
        if declared > info.file_size:
            return (f"has an array {quoted(key)} whose header declares shape {shape[:8]} of {dtype} ({declared:,} "
                    f"bytes) but whose member holds {info.file_size:,} bytes")
    return None


def read_stats_file(path: PathLike) -> tuple[dict[str, Any], Optional[str]]:
    """({category or "": {key: array}}, declared method) from a normalization_stats .npz (no pickles).

    Keys are `{category}_{mean|std|median|mad}`; bare `mean`/`std` (or `median`/`mad`) are statistics over
    all columns and come back under the category "".
    """
    path = require_path("path", path, "a statistics .npz")
    why = _not_regular(path)
    if why:
        raise _Problem(f"{path.name} could not be read: {why}")
    if not zipfile.is_zipfile(path):  # np.load would try other formats (pickle among them) next
        raise _Problem(f"{path.name} could not be read: it is not an .npz archive")
    why = directory_problem(path, STATS_MEMBERS)  # (numpy parses it here, in the caller)
    if why:
        raise _Problem(f"{path.name} was not read: it {why}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            wanted = [key for key in npz.files if _is_stats_key(key)]  # other arrays are never read
            why = archive_hazard(npz.zip.infolist(), MAX_STATS_BYTES, {f"{key}.npy" for key in wanted})
            why = why or _declared_beyond_held(npz.zip, wanted)
            if why:
                raise _Problem(f"{path.name} was not read: it {why}")
            arrays = {key: npz[key] for key in wanted}
    except _Problem:
        raise
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise _Problem(
                f"{path.name} holds pickled objects (object arrays), which are not loaded; it should hold "
                f"only numeric arrays"
            ) from None
        raise _Problem(f"{path.name} could not be read as an .npz file ({_brief(err)})") from None
    except Exception as err:
        raise _Problem(f"{path.name} could not be read as an .npz file ({_brief(err)})") from None
    method = None
    if "_normalization_method" in arrays:
        declared = np.asarray(arrays.pop("_normalization_method")).reshape(-1)
        method = str(declared[0]) if declared.size and declared.dtype.kind in "US" else None
    stats: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        for suffix in _STATS_SUFFIXES:
            if key == suffix or key.endswith("_" + suffix):
                category = key[: -len(suffix)].rstrip("_") if key != suffix else ""
                stats.setdefault(category, {})[suffix] = value
                break
        # other keys (counts, metadata) are not statistics; ignored
    return stats, method
