"""Small files built to stall or bloat a checkpoint loader, written opcode by opcode (no class of them is
ever imported by the loader). Each writer returns the path; tests/test_loader_hostile.py reads them all."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import torch

PROTO2 = b"\x80\x02"


def text(s: str) -> bytes:
    """BINUNICODE."""
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def as_checkpoint(path: Path, body: bytes) -> Path:
    """A zip checkpoint (torch.save's container) whose data.pkl is `{"feature_mask": [True] * 3, "x": <body>}`
    (body: opcodes that push one object)."""
    pickle = PROTO2 + b"}(" + text("feature_mask") + b"]" + b"(" + b"\x88" * 3 + b"e" + text("x") + body + b"u."
    buffer = io.BytesIO()
    torch.save({"feature_mask": [True] * 3}, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for info in original.infolist():
            data = pickle if info.filename.endswith("/data.pkl") else original.read(info)
            out.writestr(info.filename, data)
    return path


def quadratic_codec(path: Path, chars: int = 30_000) -> Path:
    """`_codecs.encode(<chars distinct non-ASCII characters>, "punycode")`: quadratic in the text's length."""
    s = "".join(map(chr, range(0x4E00, 0x4E00 + chars)))
    return as_checkpoint(path, global_("_codecs", "encode") + text(s) + text("punycode") + b"\x86R")


def rehashed_tuple(path: Path, doublings: int = 19, keys: int = 5_000) -> Path:
    """A tuple of 2^20 - 1 logical entries built from memo references (under the scan's limit), used as a
    dict key `keys` times: each use hashes all of it again (milliseconds each)."""
    body = b"](" + b")q\x00" + b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])
                                      for i in range(doublings))
    body += b"}" + (b"h" + bytes([doublings]) + b"K\x01s") * keys + b"e"  # [t, {t: 1}], the key set `keys` times
    return as_checkpoint(path, body)


def many_foreign_names(path: Path, names: int = 4_000, objects: int = 8_000) -> Path:
    """A list of `objects` records of `names` distinct foreign classes (NEWOBJ with no arguments)."""
    items = b"".join(global_("trainer.records", f"Record{i % names}") + b")\x81" for i in range(objects))
    return as_checkpoint(path, b"](" + items + b"e")


def tensor_with_attributes(path: Path, entries: int = 1 << 36, numel=np.int64) -> Path:
    """A stride-0 mask of `entries` entries (4 bytes stored) whose numel() the file replaces: torch's
    _rebuild_from_type_v2 sets the attribute on the rebuilt tensor."""
    mask = torch.ones(1, dtype=torch.bool).expand(entries)
    mask.numel = numel
    torch.save({"feature_mask": mask, "model_config": {"input_dim": 3}}, path)
    return path


def legacy_with_foreign_names(path: Path, names: int = 33, megabytes: int = 3) -> Path:
    """The legacy (non-zip) torch format: records of `names` foreign classes beside `megabytes` of weights.
    The classes are made here only while the file is written, under a module nobody can import."""
    import sys
    import types

    module = types.ModuleType("trainer_records")
    records = []
    for i in range(names):
        cls = type(f"Record{i}", (), {"__module__": module.__name__})
        setattr(module, cls.__name__, cls)
        obj = cls()
        obj.value = i
        records.append(obj)
    sys.modules[module.__name__] = module
    try:
        data = {"feature_mask": torch.ones(8, dtype=torch.bool), "model_config": {"input_dim": 8},
                "records": records, "model_state_dict": {"w": torch.randn(megabytes << 18)}}
        torch.save(data, path, _use_new_zipfile_serialization=False)
    finally:
        del sys.modules[module.__name__]
    return path


HOSTILE = {
    "quadratic codec": quadratic_codec,
    "rehashed tuple": rehashed_tuple,
    "many foreign names": many_foreign_names,
    "tensor with attributes": tensor_with_attributes,
    "legacy with foreign names": legacy_with_foreign_names,
}


# --- files that are cheap to unpickle but expand in the caller, or fill its messages ------------------


def _stride0(value, entries: int, dtype) -> torch.Tensor:
    return torch.full((1,), value, dtype=dtype).expand(entries)  # torch.save writes the one entry


def stride0_categories(path: Path, categories: int = 40, entries: int = 4_000_000) -> Path:
    """Each category's indices a stride-0 view of `entries` (under the 4M one value may hold): 8 bytes each in
    the file, 32 MB each once expanded."""
    groups = {f"c{i}": _stride0(0, entries, torch.int64) for i in range(categories)}
    torch.save({"feature_mask": torch.ones(8, dtype=torch.bool),
                "model_config": {"input_dim": 8, "group_indices": groups}}, path)
    return path


def stride0_statistics(path: Path, categories: int = 40, entries: int = 4_000_000) -> Path:
    """The same through normalization_stats: each category's mean and std a stride-0 view."""
    stats = {f"c{i}": {"mean": _stride0(0.0, entries, torch.float32), "std": _stride0(1.0, entries, torch.float32)}
             for i in range(categories)}
    torch.save({"feature_mask": torch.ones(8, dtype=torch.bool), "normalization_stats": stats,
                "model_config": {"input_dim": 8, "group_indices": {"c0": list(range(8))}}}, path)
    return path


def long_names(path: Path, names: int = 6, length: int = 50_000, strays: int = 3_000) -> Path:
    """Categories with 50,000-character names, and statistics for `strays` categories group_indices does not
    declare: each problem sentence about a stray would quote every declared name."""
    groups = {f"{i}" + "n" * length: [i] for i in range(names)}
    stats = {f"s{j}": {"mean": [0.0], "std": [1.0]} for j in range(strays)}
    torch.save({"feature_mask": torch.ones(names, dtype=torch.bool), "normalization_stats": stats,
                "model_config": {"input_dim": names, "group_indices": groups}}, path)
    return path


def many_categories(path: Path, categories: int = 30_000) -> Path:
    """30,000 categories that all list the same two columns (one list, referenced 30,000 times: 530 KB)."""
    shared = [0, 1]
    torch.save({"feature_mask": torch.ones(4, dtype=torch.bool),
                "model_config": {"input_dim": 4, "group_indices": {f"c{i}": shared for i in range(categories)}}}, path)
    return path


HOSTILE.update({
    "stride-0 categories": stride0_categories,
    "stride-0 statistics": stride0_statistics,
    "long names": long_names,
    "many categories": many_categories,
})
READ_WITH_STATISTICS = {"stride-0 categories", "stride-0 statistics", "long names", "many categories"}  # (others: without)


# --- zip archives whose directory is the attack ------------------------------------------------------


def raw_zip(path: Path, members: list) -> Path:
    """A zip of `members` [(name, bytes)], stored, written field by field (zip64 end records: any count)."""
    import zlib

    body, directory = bytearray(), bytearray()
    for name, data in members:
        name = name.encode()
        crc = zlib.crc32(data)
        directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 20, 0, 0, 0, 0, crc, len(data), len(data),
                                 len(name), 0, 0, 0, 0, 0, len(body)) + name
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, len(data), len(data), len(name), 0)
        body += name + data
    start, end = len(body), len(body) + len(directory)
    n = len(members)
    tail = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(directory), start)
    tail += struct.pack("<IIQI", 0x07064B50, 0, end, 1)
    tail += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(bytes(body + directory + tail))
    return path


def _checkpoint_members(data: dict) -> list:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def many_members(path: Path, members: int = 300_000) -> Path:
    """A checkpoint whose zip directory lists 300,000 more (empty) members: 18 MB of directory to parse."""
    real = _checkpoint_members({"feature_mask": torch.ones(4, dtype=torch.bool), "model_config": {"input_dim": 4}})
    prefix = real[0][0].split("/")[0]
    return raw_zip(path, real + [(f"{prefix}/extra/{i}", b"") for i in range(members)])


def two_data_records(path: Path) -> Path:
    """A checkpoint with two members named .../data.pkl: the first calls the punycode codec (refused by the
    scan, had it read that one), the last is a plain dict. zipfile reads the last, torch the first."""
    real = _checkpoint_members({"feature_mask": [True] * 3})
    prefix = real[0][0].split("/")[0]
    hidden = (PROTO2 + b"}(" + text("feature_mask") + b"](" + b"\x88" * 3 + b"e" + text("x")
              + global_("_codecs", "encode") + text("abc") + text("punycode") + b"\x86Ru.")
    records = [member for member in real if not member[0].endswith("/data.pkl")]
    plain = [member for member in real if member[0].endswith("/data.pkl")]
    return raw_zip(path, [(f"{prefix}/data.pkl", hidden)] + records + plain)  # (torch's lookup finds the first)


def many_arrays(path: Path, members: int = 300_000) -> Path:
    """A statistics .npz whose directory lists 300,000 arrays (numpy parses it in the caller)."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    array = buffer.getvalue()
    return raw_zip(path, [("c_mean.npy", array), ("c_std.npy", array)] + [(f"x{i}.npy", b"") for i in range(members)])


HOSTILE.update({
    "many members": lambda path: many_members(path, members=70_000),  # (past the 65,536 a directory may list)
    "two data records": two_data_records,
})
