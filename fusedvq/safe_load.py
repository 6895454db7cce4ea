"""Reading VQ-VAE checkpoint files without running code stored in them.

`.pt` files are read with `torch.load(weights_only=True)` plus an allow-list of the numpy types such
files contain (arrays, scalars, dtypes) and, for the classes a trainer pickles of its own, inert stand-ins
(foreign.py: records of their state; paths as strings). Anything that would run code (a function call, a
builtin, a call of a foreign class) is refused with a message naming it, before any of it runs;
`trust=True` loads it with full unpickling and warns.
`.npz` files are read with `allow_pickle=False`. checkpoint.py builds on these readers.
"""

from __future__ import annotations

import stat
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

from .bounded import BoundExceeded, ChildRefused, Limits, read_bounded
from .foreign import ForeignCallRefused, refusal, stand_ins
from .pickled import LEGACY_PICKLES, _numpy_safe_globals, _pickled_globals, scan_pickles, unsafe_names

PathLike = Union[str, Path]

# Looked for, in this order, when a folder is given instead of a file (trainer layouts: the checkpoint
# folder itself, or the run folder with checkpoints/ below it).
CHECKPOINT_NAMES = ("best_model.pt", "final_model.pt", "checkpoints/best_model.pt", "checkpoints/final_model.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit; `problems` holds one sentence per problem."""

    def __init__(self, problems: list[str], path: Optional[PathLike] = None):
        # Names taken from a file (categories, keys, paths) may hold ESC, BEL, CR, bidi controls: escaped, so
        # that a traceback cannot clear, retitle or overwrite the terminal it is printed to.
        self.problems = [printable(str(p)) for p in problems]
        self.path = path
        named = path is None or any(printable(str(path)) in p for p in self.problems)
        where = "" if named else f"{printable(str(path))}: "
        if len(self.problems) == 1:
            super().__init__(where + self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{where}{len(self.problems)} problems:\n{lines}")


def printable(text: str) -> str:
    """text with control and format characters escaped (\\x1b, \\x07, \\u200b, ...)."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class UnsafeLoadWarning(UserWarning):
    """Emitted when trust=True loads a checkpoint with full unpickling."""


class _Problem(Exception):
    """Internal: one problem sentence, raised by a parser and collected by the caller."""


# ---------------------------------------------------------------------------------------------------
# Reading: path → dict, refusing pickled code
# ---------------------------------------------------------------------------------------------------


# What a loader may inflate: a member of a zip archive (a .pt record, an .npz array) whose declared size
# exceeds both of these is refused before it is read. torch.save stores records uncompressed, so a large
# record means a large file; a small file that declares gigabytes is a decompression bomb.
MAX_INFLATION = 16  # declared size / compressed size
MAX_INFLATED_BYTES = 64 << 20
# Statistics arrays hold one number per column: an .npz member larger than this is not statistics.
MAX_STATS_MEMBER_BYTES = 64 << 20


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


def check_archive_sizes(path: Path, member_limit: Optional[int] = None, members=None) -> None:
    """Refuse a zip archive whose members (or the named ones) declare more than they could honestly hold:
    raises _Problem naming the member and both sizes. Reads only the central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise _Problem(f"{path.name} is a damaged zip archive ({_brief(err)})") from None
    for info in infos:
        if members is not None and info.filename not in members:
            continue
        inflates = info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
            MAX_INFLATED_BYTES, MAX_INFLATION * max(info.compress_size, 1))
        too_big = member_limit is not None and info.file_size > member_limit
        if inflates or too_big:
            raise _Problem(
                f"{path.name} was not read: its member {info.filename!r} declares {info.file_size:,} bytes "
                f"from {info.compress_size:,} stored" + (" (a decompression bomb?)" if inflates else
                                                        f", more than the {member_limit:,} that statistics need")
            )


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint file for `path`: the file itself, or the checkpoint inside a folder."""
    path = Path(path)
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
                f"{file} could not be loaded with trust=True: it pickles objects of the module {err.name!r}, which "
                f"is not installed; without trust=True they are read as records of their state instead"
            ]) from None
        except Exception as err:
            raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({_brief(err)})"]) from None
    else:
        data = _load_inertly(file)
    if not isinstance(data, Mapping):
        raise CheckpointError([f"{file} holds a {type(data).__name__}, not the dict a VQ-VAE trainer writes"])
    return dict(data)


# A legacy-format file may name globals the scan missed one refusal at a time; more rounds than this is not
# a checkpoint. A file naming more foreign classes than MAX_FOREIGN_NAMES is not one either (each name is a
# stand-in torch's allow-list checks on every object).
_MAX_LOAD_ROUNDS = 8
MAX_FOREIGN_NAMES = 64


def _load_inertly(file: Path):
    """The inert load (_inert_load) run in a child process within Limits.for_file (bounded.py): whatever the
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


def _inert_load(file: Path):
    """torch.load(weights_only=True) with numpy's types and, for each foreign class the file names, a
    stand-in that reads its objects as records (foreign.py). Refuses, naming them, the globals no stand-in
    is made for, a file that calls a stand-in class, and what scan_pickles finds unbounded; nothing stored
    in the file runs. Runs in the bounded child (see _load_inertly)."""
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


def _check_checkpoint_file(file: Path, trust: bool = False) -> None:
    """What can be told of a checkpoint before torch.load reads it: empty, not a checkpoint's format at
    all (or one only a full unpickling reads), or a zip archive whose records declare more than the file
    can hold."""
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint: it is empty (0 bytes)"])
    if zipfile.is_zipfile(file) and not _is_tar(file):  # (a tar that holds a zip ends like one)
        try:
            check_archive_sizes(file)
        except _Problem as p:
            raise CheckpointError([str(p)]) from None
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


def _unreadable_protocol(file: Path, err: BaseException, scan) -> Optional[CheckpointError]:
    """The error for a pickle whose protocol torch's safe loader does not read (4 and 5: FRAME, ...)."""
    if "Unsupported operand" not in str(err) or scan.protocol < 4:
        return None
    return CheckpointError([
        f"{file} was pickled with protocol {scan.protocol} (torch.save(..., pickle_protocol={scan.protocol})), "
        f"which torch's safe loader does not read (it reads protocols 2 and 3): " + _RESAVE
    ])


def _brief(err: BaseException) -> str:
    """The last meaningful line of an exception message (torch's are long)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


_STATS_SUFFIXES = ("mean", "std", "median", "mad")


def _is_stats_key(key: str) -> bool:
    return key == "_normalization_method" or any(key == sfx or key.endswith("_" + sfx) for sfx in _STATS_SUFFIXES)


def read_stats_file(path: PathLike) -> tuple[dict[str, Any], Optional[str]]:
    """({category or "": {key: array}}, declared method) from a normalization_stats .npz (no pickles).

    Keys are `{category}_{mean|std|median|mad}`; bare `mean`/`std` (or `median`/`mad`) are statistics over
    all columns and come back under the category "".
    """
    path = Path(path)
    why = _not_regular(path)
    if why:
        raise _Problem(f"{path.name} could not be read: {why}")
    if not zipfile.is_zipfile(path):  # np.load would try other formats (pickle among them) next
        raise _Problem(f"{path.name} could not be read: it is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            wanted = [key for key in npz.files if _is_stats_key(key)]  # other arrays are never read
            check_archive_sizes(path, MAX_STATS_MEMBER_BYTES, {f"{key}.npy" for key in wanted})
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
