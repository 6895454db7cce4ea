"""Pickled objects of classes fusedvq does not have, read as inert records: nothing of theirs is imported
or run.

A VQ-VAE trainer pickles its own classes into a checkpoint (statistics dataclasses, `pathlib.PosixPath`
in its config). Reading the mask and a few arrays must not need that trainer's package installed, let
alone run its code. torch.load(weights_only=True) resolves every global a pickle names through an
allow-list, to which `torch.serialization.safe_globals` can add an object under any name; this module
supplies those objects:

    a class-like name (`pkg.mod.CamelCase`) → a stand-in class made here. Pickle builds objects of a class
        with NEWOBJ (`cls.__new__(cls, *args)`, then BUILD with the state): the stand-in's __new__ and
        __setstate__ only store what they are given, so the object becomes a ForeignObject record of its
        class name, its arguments and its state. Calling the class (a REDUCE, which is how a pickle
        runs a function) raises ForeignCallRefused instead of constructing anything.
    the pathlib path classes → a function that joins the parts into a string with the pure (I/O-free)
        path classes: paths in a config come back as str.
    anything else (functions, builtins, os / subprocess / ..., torch and numpy names torch does not
        allow) → refused before the file is read: `refusal(name)` says why.

The chosen mechanism is PyTorch's own weights-only unpickler, not a hand-written one: its opcode
handling, memo limits and allow-list are maintained with torch, and the stand-ins only widen the
allow-list by objects that cannot do anything.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Optional

# Modules whose names are never given a stand-in: they hold the callables a malicious pickle reaches for
# (and a class-like name in them, e.g. subprocess.Popen, is a constructor that acts, not a data record).
_REFUSED_MODULES = frozenset({
    "builtins", "__builtin__", "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy",
    "pickle", "_pickle", "copyreg", "copy_reg", "marshal", "shutil", "socket", "ctypes", "code", "codeop",
    "pty", "operator", "functools", "types", "io", "_io", "pdb", "bdb", "timeit", "multiprocessing",
    "asyncio", "threading", "_thread", "signal", "tempfile", "glob", "platform", "webbrowser", "urllib",
    "http", "ftplib", "smtplib", "inspect", "ast", "site", "zipimport", "pkgutil", "imp", "gc", "weakref",
    "contextlib", "torch", "numpy", "pathlib", "collections", "typing", "abc", "enum", "dataclasses",
    # Python 2 spellings, which pickle protocols 0-2 write for some of the above (subprocess → commands)
    "commands", "cPickle", "popen2", "urllib2", "SocketServer", "exceptions",
})

# Builtin data types torch's weights-only reader does not build (it builds set, complex, bytearray): refused
# for that reason, not because they could act.
_DATA_TYPES = frozenset({"frozenset", "range", "slice", "memoryview", "list", "dict", "tuple", "str", "int", "float",
                         "bool"})

_POSIX_PATHS = ("PosixPath", "PurePosixPath", "Path", "PurePath")
_WINDOWS_PATHS = ("WindowsPath", "PureWindowsPath")


class ForeignCallRefused(Exception):
    """A pickle asked to call a stand-in class (a REDUCE), which would run that class's code."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"the file calls {name}(...) to build an object, which would run that class's code")


class _StandInType(type):
    """The metaclass of the stand-ins: calling one is refused (pickle calls a class only through REDUCE)."""

    def __call__(cls, *args, **kwargs):
        raise ForeignCallRefused(cls.class_name)


class ForeignObject(metaclass=_StandInType):
    """A pickled object of a class that was not imported: `class_name` (module.Qualname as pickled),
    `args` (what the pickle passed to __new__) and `state` (what it set with BUILD: usually the
    instance's __dict__). `attributes` is the state as a dict."""

    __slots__ = ("args", "state")
    class_name = "?"

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state):
        self.state = state

    @property
    def attributes(self) -> dict:
        """The object's attributes by name: its __dict__ state, and slot state when pickled as a pair."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, Mapping) for s in state):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        # Attribute names are strings; other keys (a record, a tuple) are not turned into text: a record keyed
        # by itself would recurse, and memo references can make a tuple exponentially large.
        return {k: v for k, v in state.items() if isinstance(k, str)} if isinstance(state, Mapping) else {}

    def __repr__(self) -> str:
        keys = ", ".join(list(self.attributes)[:8]) or "no attributes"
        return f"<{self.class_name} read as a record: {keys}>"


def stand_in_class(name: str) -> type:
    """A fresh ForeignObject subclass that records objects pickled as `name`."""
    short = name.rsplit(".", 1)[-1]
    return _StandInType(short, (ForeignObject,), {"__slots__": (), "class_name": name, "__module__": __name__})


def _path_string(pure: type, name: str):
    def path_string(*parts: Any) -> str:
        if not all(isinstance(p, str) for p in parts):
            raise ForeignCallRefused(name)
        return str(pure(*parts))

    return path_string


def is_path_class(name: str) -> bool:
    module, _, short = name.rpartition(".")
    return module in ("pathlib", "pathlib._local") and short in _POSIX_PATHS + _WINDOWS_PATHS


def refusal(name: str) -> Optional[str]:
    """Why no stand-in is made for the global `name` (a sentence fragment), or None when one can be."""
    if is_path_class(name):
        return None
    module, _, short = name.rpartition(".")
    top = module.split(".", 1)[0]
    if not module:
        return f"{name} is a builtin"
    if module == "builtins" and short in _DATA_TYPES:
        return f"{name} is a container type that torch.load(weights_only=True) does not build either"
    if top in _REFUSED_MODULES:
        return f"{name} belongs to {top}, whose objects can act"
    if not all(part.isidentifier() for part in name.split(".")):
        return f"{name[:200]!r} is not a Python name (it holds characters no module or class name has)"
    if not short[:1].isupper():
        return f"{name} is a function, not a class"
    return None


def stand_ins(names) -> list:
    """The (object, name) pairs for torch.serialization.safe_globals that let `names` be read inertly
    (names that `refusal` refuses are left out: the caller refuses the file)."""
    pairs = []
    for name in names:
        if is_path_class(name):
            pure = PureWindowsPath if name.rsplit(".", 1)[-1] in _WINDOWS_PATHS else PurePosixPath
            pairs.append((_path_string(pure, name), name))
        elif refusal(name) is None:
            pairs.append((stand_in_class(name), name))
    return pairs

