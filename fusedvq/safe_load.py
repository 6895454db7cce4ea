"""Reading VQ-VAE checkpoint files without running code stored in them.

`.pt` files are read with `torch.load(weights_only=True)` plus an allow-list of the numpy types such
files contain (arrays, scalars, dtypes). Anything else pickled (a class, a function call) is refused with
a message naming it, before any of it runs; `trust=True` loads it with full unpickling and warns.
`.npz` files are read with `allow_pickle=False`. checkpoint.py builds on these readers.
"""

from __future__ import annotations

import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch

PathLike = Union[str, Path]

# Looked for, in this order, when a folder is given instead of a file (trainer layouts: the checkpoint
# folder itself, or the run folder with checkpoints/ below it).
CHECKPOINT_NAMES = ("best_model.pt", "final_model.pt", "checkpoints/best_model.pt", "checkpoints/final_model.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit; `problems` holds one sentence per problem."""

    def __init__(self, problems: list[str], path: Optional[PathLike] = None):
        self.problems = list(problems)
        self.path = path
        named = path is None or any(str(path) in p for p in self.problems)
        where = "" if named else f"{path}: "
        if len(self.problems) == 1:
            super().__init__(where + self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{where}{len(self.problems)} problems:\n{lines}")


class UnsafeLoadWarning(UserWarning):
    """Emitted when trust=True loads a checkpoint with full unpickling."""


class _Problem(Exception):
    """Internal: one problem sentence, raised by a parser and collected by the caller."""


# ---------------------------------------------------------------------------------------------------
# Reading: path → dict, refusing pickled code
# ---------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: PathLike) -> Path:
    """The checkpoint file for `path`: the file itself, or the checkpoint inside a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError([f"no checkpoint at {path}: the path does not exist"])
    for name in CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth") and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError([f"the folder {path} holds no checkpoint (no .pt or .pth file)"])
    names = ", ".join(p.name for p in found[:5]) + (", ..." if len(found) > 5 else "")
    raise CheckpointError([
        f"the folder {path} holds {len(found)} checkpoints ({names}) and none is named best_model.pt or "
        f"final_model.pt: pass the file itself"
    ])


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


def _pickled_globals(path: Path, error: BaseException) -> list[str]:
    """Names of the non-allow-listed globals a file references, found without running any of it."""
    allowed = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in _numpy_safe_globals()}
    names: list[str] = []
    if zipfile.is_zipfile(path):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            names = []
    else:
        names = _raw_pickle_globals(path)
        names += re.findall(r"GLOBAL ([\w.]+)", str(error))
    found = {n for n in names if n not in allowed and not n.startswith("torch.")}
    # The error text names globals without their module ("getattr"); keep the qualified spelling.
    return sorted(n for n in found if "." in n or not any(m.endswith("." + n) for m in found))


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


def read_checkpoint(path: PathLike, *, trust: bool = False) -> dict:
    """The checkpoint's dict, loaded on the CPU without running pickled code (unless trust=True).

    Raises CheckpointError with a sentence that says what is wrong (missing, unreadable, refused).
    """
    file = resolve_checkpoint(path)
    if trust:
        warnings.warn(
            f"loading {file} with trust=True: full unpickling can run arbitrary code stored in the file; "
            f"do this only for files from a source you trust",
            UnsafeLoadWarning,
            stacklevel=2,
        )
        try:
            data = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({_brief(err)})"]) from None
    else:
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_safe_globals()):
                warnings.simplefilter("ignore")  # torch's notes about pickle protocols are noise here
                data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            unsafe = _pickled_globals(file, err)
            if unsafe:
                shown = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
                raise CheckpointError([
                    f"{file} was not loaded: it contains pickled Python objects ({shown}) that could run code "
                    f"when loaded; only tensors, numbers, strings, lists, dicts and numpy arrays are loaded by "
                    f"default. If you trust the file's source, pass trust=True (CLI: --trust)"
                ]) from None
            raise CheckpointError([f"{file} could not be read as a PyTorch checkpoint ({_brief(err)})"]) from None
    if not isinstance(data, Mapping):
        raise CheckpointError([f"{file} holds a {type(data).__name__}, not the dict a VQ-VAE trainer writes"])
    return dict(data)


def _brief(err: BaseException) -> str:
    """The last meaningful line of an exception message (torch's are long)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_stats_file(path: PathLike) -> tuple[dict[str, Any], Optional[str]]:
    """({category or "": {key: array}}, declared method) from a normalization_stats .npz (no pickles).

    Keys are `{category}_{mean|std|median|mad}`; bare `mean`/`std` (or `median`/`mad`) are statistics over
    all columns and come back under the category "".
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):  # np.load would try other formats (pickle among them) next
        raise _Problem(f"{path.name} could not be read: it is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
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
        method = str(np.asarray(arrays.pop("_normalization_method")).reshape(-1)[0])
    stats: dict[str, dict[str, Any]] = {}
    for key, value in arrays.items():
        for suffix in ("mean", "std", "median", "mad"):
            if key == suffix or key.endswith("_" + suffix):
                category = key[: -len(suffix)].rstrip("_") if key != suffix else ""
                stats.setdefault(category, {})[suffix] = value
                break
        # other keys (counts, metadata) are not statistics; ignored
    return stats, method
