"""What the checkpoint layer raises and warns, and the escaping of names taken from a file.

CheckpointError carries one sentence per problem, for the user; _Problem is one sentence raised by a lenient
reader and collected by its caller (Declared.problems, declared.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]


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


class StatsNotUsedWarning(UserWarning):
    """A statistics file found beside a checkpoint was not used: the checkpoint's own statistics (saved with
    its model) were, and the file disagrees with them or cannot be read. Pass stats=... to choose."""


class _Problem(Exception):
    """Internal: one problem sentence, raised by a parser and collected by the caller."""


def _brief(err: BaseException) -> str:
    """The last meaningful line of an exception message (torch's are long)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith("Check the documentation")]
    text = lines[-1] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
