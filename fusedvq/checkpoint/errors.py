"""What the checkpoint layer raises and warns, the escaping and shortening of names taken from a file, and
the checks of the loaders' own arguments.

CheckpointError carries one sentence per problem, for the user; _Problem is one sentence raised by a lenient
reader and collected by its caller (Declared.problems, declared.py). A file chooses its names and how many
there are: a sentence quotes a name shortened (quoted), a list of them cut ("and N more"), and an error
holds at most MAX_PROBLEMS sentences of at most MAX_SENTENCE characters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

PathLike = Union[str, Path]

MAX_PROBLEMS = 24  # sentences one CheckpointError (or `fusedvq check`) reports; the rest are counted
MAX_SENTENCE = 2_000  # characters of one sentence
MAX_NAME = 60  # characters of a name quoted from a file


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit; `problems` holds one sentence per problem (a single
    sentence may be given as a str)."""

    def __init__(self, problems: Union[str, list[str]], path: Optional[PathLike] = None):
        if isinstance(problems, str):
            problems = [problems]
        # Names taken from a file (categories, keys, paths) may hold ESC, BEL, CR, bidi controls: escaped, so
        # that a traceback cannot clear, retitle or overwrite the terminal it is printed to.
        self.problems = capped([printable(_shortened(str(p), MAX_SENTENCE)) for p in problems[:MAX_PROBLEMS + 1]],
                               len(problems))
        self.path = path
        shown = printable(_shortened(str(path), MAX_SENTENCE)) if path is not None else ""
        named = path is None or any(shown in p for p in self.problems)
        where = "" if named else f"{shown}: "
        if len(self.problems) == 1:
            super().__init__(where + self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{where}{len(problems)} problems:\n{lines}")

    def __reduce__(self):  # (pickled, e.g. across processes: the same problems and path, not one long text)
        return type(self), (self.problems, self.path)


def capped(problems: list[str], total: Optional[int] = None) -> list[str]:
    """At most MAX_PROBLEMS sentences; past that, the last one says how many more there are (`total`: how
    many there were, when `problems` is already cut)."""
    total = len(problems) if total is None else total
    if total <= MAX_PROBLEMS:
        return list(problems)
    return list(problems[: MAX_PROBLEMS - 1]) + [f"... and {total - MAX_PROBLEMS + 1:,} more problems"]


def printable(text: str) -> str:
    """text with control and format characters escaped (\\x1b, \\x07, \\u200b, ...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text):,} characters)"


def quoted(name: Any) -> str:
    """A name taken from a file, quoted for a sentence: repr of at most MAX_NAME characters of it."""
    if not isinstance(name, str):
        return f"<{type(name).__name__}>"
    return repr(name) if len(name) <= MAX_NAME else repr(name[: MAX_NAME - 3]) + f"... ({len(name):,} characters)"


def listed(names, shown: int = 5) -> str:
    """Names quoted and joined, cut after `shown` with "and N more"."""
    names = list(names) if not isinstance(names, list) else names
    text = ", ".join(quoted(n) for n in names[:shown])
    return text + (f" and {len(names) - shown:,} more" if len(names) > shown else "")


class UnsafeLoadWarning(UserWarning):
    """Emitted when trust=True loads a checkpoint with full unpickling."""


class StatsNotUsedWarning(UserWarning):
    """A statistics file found beside a checkpoint was not used: the checkpoint's own statistics (saved with
    its model) were, and the file disagrees with them or cannot be read. Pass stats=... to choose."""


class _Problem(Exception):
    """Internal: one problem sentence, raised by a parser and collected by the caller."""


def _brief(err: BaseException) -> str:
    """The last meaningful line of an exception message (torch's are long)."""
    lines = [ln.strip() for ln in str(err)[:10_000].splitlines()
             if ln.strip() and not ln.startswith("Check the documentation")]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------
# The loaders' own arguments: exactly what they say, never coerced
# ---------------------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, bytes, int, float, complex, np.generic, type(None))) else ""
    text = text if text and len(text) <= MAX_NAME else f"a {type(value).__name__}"
    return f"{type(value).__name__} {text}" if not text.startswith("a ") else text


def require_flag(name: str, value: Any) -> bool:
    """`value` as a bool: True or False (or a numpy bool) only. A string such as "False" is a TypeError,
    never truthy."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_shown(value)}")


def require_count(name: str, value: Any, what: str) -> Optional[int]:
    """`value` as a positive int (an int or numpy integer; not a bool, a float or a string), or None."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int ({what}), got {_shown(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int ({what}), got {int(value)}")
    return int(value)


def require_path(name: str, value: Any, what: str) -> Path:
    """`value` as a Path: a str or os.PathLike (anything else is a TypeError naming the argument)."""
    if isinstance(value, str) or (isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)):
        return Path(value)
    raise TypeError(f"{name} must be the path of {what} (a str or os.PathLike), got {_shown(value)}")
