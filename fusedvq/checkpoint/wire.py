"""What crosses the pipe from the bounded child (isolation.py): a read result as plain data, and back.

The child encodes what the reader returned as nested tuples of plain values (what marshal writes) plus the
raw bytes of each tensor storage, sent once; the parent rebuilds the objects from them. What comes back:
dicts (keys that are str, int, float, bool or None), lists, tuples, sets, numbers, strings, bytes, numpy
arrays (in their memory order) and scalars of plain dtypes, tensors (their storage bytes and view geometry,
rebuilt as plain tensors: no subclass, no attribute a file set), torch dtypes and devices, and the records
of foreign objects (records.py). Shared and cyclic references are kept as such: an object (a tensor, an
array, a container) referenced twice comes back as one object referenced twice, as torch.load returns it.
Anything else (a quantized or sparse tensor among them) becomes a record naming what it is. At most
MAX_NODES objects and references, MAX_DEPTH levels: a result past that is refused.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any

import numpy as np
import torch

from .records import ForeignObject, stand_in_class

MAX_NODES = 2_000_000  # objects and references in the read result
MAX_DEPTH = 200  # nesting levels
_DICTS = {"dict": dict, "OrderedDict": OrderedDict, "Counter": Counter}


class ResultEncoder:
    """A read result → nested tuples of plain values (what marshal writes). Every object that is not a plain
    value is sent once, with its reference number `ref`, and as ("r", ref) wherever it is met again, so shared
    and cyclic references come back as such: ("d", ref, [(key, node)]), ("l", ref, [node]), ("t", ref,
    [node]), ("s", ref, [node]) for sets, ("f", ref, class name, args, state) for records, ("a", ref, descr,
    shape, order, bytes) for arrays (shape None: a numpy scalar), ("x", ref, storage, dtype, shape, stride,
    offset, requires_grad) for tensors (each storage sent once), ("y"/"v", ref, name) for torch dtypes and
    devices, ("o", ref, type name) else."""

    def __init__(self):
        self.nodes = 0
        self.storages: list[np.ndarray] = []  # uint8 views of the tensors' storages (no copy)
        self._storage_ids: dict = {}
        self._seen: dict = {}  # id(object) → its reference number (the objects live in the result meanwhile)

    def node(self, obj: Any, depth: int):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"it holds more than {MAX_NODES:,} objects and references; no checkpoint needs that many")
        if depth > MAX_DEPTH:
            raise ValueError(f"its objects are nested more than {MAX_DEPTH} levels deep")
        if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
            return obj
        if id(obj) in self._seen:
            return ("r", self._seen[id(obj)])
        ref = self._seen[id(obj)] = len(self._seen)
        if isinstance(obj, dict):  # (an OrderedDict, as state_dict() gives, or a Counter, stays one)
            kind = type(obj).__name__ if type(obj) in (OrderedDict, Counter) else "dict"
            return ("d", ref, [(k, self.node(v, depth + 1)) for k, v in obj.items() if _plain_key(k)], kind)
        if isinstance(obj, (list, tuple, set)):
            tag = "l" if isinstance(obj, list) else "t" if isinstance(obj, tuple) else "s"
            return (tag, ref, [self.node(v, depth + 1) for v in obj])
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, ref)
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise ValueError("it holds a numpy array of dtype object")
            order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
            return ("a", ref, np.lib.format.dtype_to_descr(obj.dtype), obj.shape, order, obj.tobytes(order))
        if isinstance(obj, np.generic):
            return ("a", ref, np.lib.format.dtype_to_descr(obj.dtype), None, "C", obj.tobytes())
        if isinstance(obj, ForeignObject):
            return ("f", ref, obj.class_name, self.node(obj.args, depth + 1), self.node(obj.state, depth + 1))
        if isinstance(obj, (torch.dtype, torch.device)):
            return ("y" if isinstance(obj, torch.dtype) else "v", ref, str(obj))
        return ("o", ref, f"{type(obj).__module__}.{type(obj).__qualname__}")

    def _tensor(self, t: torch.Tensor, ref: int):
        # Methods through the class: a file can set attributes on the instance (numel = ...) that shadow them.
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.__dict__:
            raise ValueError("it holds a tensor rebuilt with a subclass or with attributes set by the file")
        if t.is_quantized or t.layout != torch.strided or t.device.type != "cpu":
            # Not carried back, not refused: a record named for what it is (a quantized model's weights do not
            # keep its mask from being read; a mask stored so is said to be one).
            kind = (f"quantized {str(t.dtype).removeprefix('torch.')}" if t.is_quantized
                    else str(t.layout).removeprefix("torch.") if t.layout != torch.strided else t.device.type)
            return ("o", ref, f"{kind} tensor")
        storage = torch.Tensor.untyped_storage(t)
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._storage_ids:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._storage_ids[key] = len(self.storages)
            self.storages.append(raw.numpy())
        return ("x", ref, self._storage_ids[key], str(t.dtype).removeprefix("torch."), tuple(torch.Tensor.size(t)),
                tuple(torch.Tensor.stride(t)), int(torch.Tensor.storage_offset(t)), bool(t.requires_grad))


def _plain_key(key: Any) -> bool:
    return key is None or type(key) in (bool, int, float, str, bytes)


class ResultDecoder:
    """Plain data → the objects a reader returned (tensors rebuilt over the storages read from the pipe); an
    object referenced twice comes back as one object referenced twice."""

    def __init__(self, storages: list):
        self.storages = storages
        self._rebuilt: dict = {}
        self._classes: dict = {}
        self._refs: dict = {}

    def value(self, node):
        if type(node) is not tuple:
            return node
        tag, ref = node[0], node[1]
        if tag == "r":
            # (None only for a tuple that holds itself through a list, which needs the POP opcodes torch's
            # weights-only unpickler does not read: it never comes from a file)
            return self._refs.get(ref)
        if tag == "d":
            out = self._refs[ref] = _DICTS.get(node[3], dict)()
            for key, value in node[2]:  # (item by item: Counter.update would count the pairs)
                out[key] = self.value(value)
            return out
        if tag == "l":
            out = self._refs[ref] = []
            out.extend(self.value(v) for v in node[2])
            return out
        if tag == "f":
            record = self._refs[ref] = ForeignObject.__new__(self._stand_in(node[2]))
            args = self.value(node[3])
            record.args = args if isinstance(args, tuple) else ()
            record.__setstate__(self.value(node[4]))
            return record
        self._refs[ref] = out = self._leaf(tag, node)
        return out

    def _leaf(self, tag: str, node):
        """The objects that cannot hold themselves: built after their parts."""
        if tag == "t":
            return tuple(self.value(v) for v in node[2])
        if tag == "s":
            return set(self.value(v) for v in node[2])
        if tag == "a":
            _, _, descr, shape, order, data = node
            dtype = np.lib.format.descr_to_dtype(descr)
            array = np.frombuffer(data, dtype=dtype)
            if shape is None:
                return array[0]
            out = np.empty(shape, dtype=dtype, order=order)  # (writable, in the file's memory order)
            if out.size:
                out.reshape(-1, order=order)[...] = array  # (a view: `out` is contiguous in that order)
            return out
        if tag == "x":
            return self._tensor(*node[2:])
        if tag == "y":
            return getattr(torch, node[2].removeprefix("torch."))
        if tag == "v":
            return torch.device(node[2])
        return ForeignObject.__new__(self._stand_in(node[2]))  # ("o", type name): an object not carried back

    def _stand_in(self, name: str) -> type:
        return self._classes.get(name) or self._classes.setdefault(name, stand_in_class(name))

    def _tensor(self, index, dtype, shape, stride, offset, requires_grad):
        if index not in self._rebuilt:
            data = self.storages[index]  # a bytearray of its own: the tensors keep it alive
            empty = torch.empty(0, dtype=torch.uint8)
            self._rebuilt[index] = torch.frombuffer(data, dtype=torch.uint8) if data else empty
        kind = getattr(torch, dtype)
        storage = self._rebuilt[index].untyped_storage()
        tensor = torch.empty(0, dtype=kind).set_(storage, offset, shape, stride)
        return tensor.requires_grad_() if requires_grad and tensor.is_floating_point() else tensor
