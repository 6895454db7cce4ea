"""What crosses the pipe from the bounded child (isolation.py): a read result as plain data, and back.

The child encodes what the reader returned as nested tuples of plain values (what marshal writes) plus the
raw bytes of each tensor storage, sent once; the parent rebuilds the objects from them. What comes back:
dicts (keys that are str, int, float, bool or None), lists, tuples, numbers, strings, bytes, numpy arrays and
scalars of plain dtypes, tensors (their storage bytes and view geometry, rebuilt as plain tensors: no
subclass, no attribute a file set), torch dtypes and devices, and the records of foreign objects
(records.py), shared and cyclic references kept as such. Anything else becomes a record naming its type. At
most MAX_NODES objects and references, MAX_DEPTH levels: a result past that is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .records import ForeignObject, stand_in_class

MAX_NODES = 2_000_000  # objects and references in the read result
MAX_DEPTH = 200  # nesting levels


class ResultEncoder:
    """A read result → nested tuples of plain values (what marshal writes): ("d", ref, [(key, node)]),
    ("l", ref, [node]), ("t", ref, [node]), ("f", ref, class name, args, state) for records, ("r", ref) for
    a container met before, ("a", descr, shape, bytes) for arrays and numpy scalars, ("x", storage, dtype,
    shape, stride, offset, requires_grad) for tensors (each storage sent once), ("o", type name) else."""

    def __init__(self):
        self.nodes = 0
        self.storages: list[np.ndarray] = []  # uint8 views of the tensors' storages (no copy)
        self._storage_ids: dict = {}
        self._seen: dict = {}  # id(container) → its reference number

    def node(self, obj: Any, depth: int):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ValueError(f"it holds more than {MAX_NODES:,} objects and references; no checkpoint needs that many")
        if depth > MAX_DEPTH:
            raise ValueError(f"its objects are nested more than {MAX_DEPTH} levels deep")
        if obj is None or type(obj) in (bool, int, float, complex, str, bytes):
            return obj
        # An object met again is sent as a reference to its first encoding: shared structure stays shared
        # (readers of the result size shared lists once), and a cycle ends.
        if id(obj) in self._seen:
            return ("r", self._seen[id(obj)])
        self._seen[id(obj)] = len(self._seen)
        ref = self._seen[id(obj)]
        if isinstance(obj, dict):
            return ("d", ref, [(k, self.node(v, depth + 1)) for k, v in obj.items() if _plain_key(k)])
        if isinstance(obj, (list, tuple)):
            return ("l" if isinstance(obj, list) else "t", ref, [self.node(v, depth + 1) for v in obj])
        if isinstance(obj, (set, frozenset)):
            return ("s", [v for v in obj if _plain_key(v)])
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise ValueError("it holds a numpy array of dtype object")
            return ("a", np.lib.format.dtype_to_descr(obj.dtype), obj.shape, np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, np.generic):
            return ("a", np.lib.format.dtype_to_descr(obj.dtype), None, obj.tobytes())
        if isinstance(obj, ForeignObject):
            return ("f", ref, obj.class_name, self.node(obj.args, depth + 1), self.node(obj.state, depth + 1))
        if isinstance(obj, (torch.dtype, torch.device)):
            return ("y" if isinstance(obj, torch.dtype) else "v", str(obj))
        return ("o", f"{type(obj).__module__}.{type(obj).__qualname__}")

    def _tensor(self, t: torch.Tensor):
        # Methods through the class: a file can set attributes on the instance (numel = ...) that shadow them.
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.__dict__:
            raise ValueError("it holds a tensor rebuilt with a subclass or with attributes set by the file")
        if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized:
            raise ValueError(f"it holds a tensor of layout {t.layout} on {t.device}, not a plain CPU tensor")
        storage = torch.Tensor.untyped_storage(t)
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._storage_ids:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._storage_ids[key] = len(self.storages)
            self.storages.append(raw.numpy())
        return ("x", self._storage_ids[key], str(t.dtype).removeprefix("torch."), tuple(torch.Tensor.size(t)),
                tuple(torch.Tensor.stride(t)), int(torch.Tensor.storage_offset(t)), bool(t.requires_grad))


def _plain_key(key: Any) -> bool:
    return key is None or type(key) in (bool, int, float, str, bytes)


class ResultDecoder:
    """Plain data → the objects a reader returned (tensors rebuilt over the storages read from the pipe)."""

    def __init__(self, storages: list):
        self.storages = storages
        self._rebuilt: dict = {}
        self._classes: dict = {}
        self._refs: dict = {}

    def value(self, node):
        if type(node) is not tuple:
            return node
        tag = node[0]
        if tag == "r":
            return self._refs.get(node[1])  # (None only for a tuple that holds itself through a list)
        if tag == "d":
            out = self._refs[node[1]] = {}
            out.update((k, self.value(v)) for k, v in node[2])
            return out
        if tag == "l":
            out = self._refs[node[1]] = []
            out.extend(self.value(v) for v in node[2])
            return out
        if tag == "t":
            out = self._refs[node[1]] = tuple(self.value(v) for v in node[2])
            return out
        if tag == "s":
            return set(node[1])
        if tag == "a":
            array = np.frombuffer(node[3], dtype=np.lib.format.descr_to_dtype(node[1]))
            return array[0] if node[2] is None else array.reshape(node[2]).copy()
        if tag == "x":
            return self._tensor(*node[1:])
        if tag == "f":
            cls = self._classes.get(node[2]) or self._classes.setdefault(node[2], stand_in_class(node[2]))
            record = self._refs[node[1]] = ForeignObject.__new__(cls)
            args = self.value(node[3])
            record.args = args if isinstance(args, tuple) else ()
            record.__setstate__(self.value(node[4]))
            return record
        if tag == "y":
            return getattr(torch, node[1].removeprefix("torch."))
        if tag == "v":
            return torch.device(node[1])
        cls = self._classes.get(node[1]) or self._classes.setdefault(node[1], stand_in_class(node[1]))
        return ForeignObject.__new__(cls)  # ("o", type name): an object of a type not carried back

    def _tensor(self, index, dtype, shape, stride, offset, requires_grad):
        if index not in self._rebuilt:
            data = self.storages[index]  # a bytearray of its own: the tensors keep it alive
            self._rebuilt[index] = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        kind = getattr(torch, dtype)
        storage = self._rebuilt[index].untyped_storage()
        tensor = torch.empty(0, dtype=kind).set_(storage, offset, shape, stride)
        return tensor.requires_grad_() if requires_grad and tensor.is_floating_point() else tensor
