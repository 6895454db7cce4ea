"""Zip archives (torch.save's container, numpy's .npz) checked before anything in them is inflated or read.

A zip's central directory lists its members; a file chooses how many, how large each says it is, and their
names. So:

    zip_directory   the end record only (a few bytes at the end of the file, O(1)): how many members the
                    directory lists and how many bytes it spans. A directory past MAX_MEMBERS members (or
                    ENTRY_BYTES each) is refused before it is parsed (parsing 300,000 entries takes seconds).
    archive_hazard  the parsed directory: a member whose declared size is a decompression bomb, members
                    past a byte limit, and two members of one name (zipfile reads the last of them, torch's
                    reader the first: the scan and the load must read the same bytes).

Checkpoints are parsed only in the bounded child (inert.py, through scan_pickles); statistics .npz files,
which numpy reads in the caller, under the smaller STATS_MEMBERS cap.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path
from typing import Optional

from .errors import quoted

# What a loader may inflate: a member of a zip archive (a .pt record, an .npz array) whose declared size
# exceeds both of these is refused before it is read. torch.save stores records uncompressed, so a large
# record means a large file; a small file that declares gigabytes is a decompression bomb.
MAX_INFLATION = 16  # declared size / compressed size
MAX_INFLATED_BYTES = 64 << 20
# Statistics arrays hold one number per column: .npz members read for statistics hold at most this in all.
MAX_STATS_BYTES = 64 << 20
# A checkpoint holds one member per storage and a few more; a statistics file two per category.
MAX_MEMBERS = 1 << 16
STATS_MEMBERS = 1 << 12
# A directory entry is 46 bytes and its name (torch's: the file's stem, /data/, the storage's number).
ENTRY_BYTES = 256


def zip_directory(path: Path) -> Optional[tuple[int, int]]:
    """(members listed, bytes the central directory spans) from a zip's end record, or None when `path` is
    not a zip archive (or the end record cannot be read). Reads the end of the file only."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # (what zipfile.is_zipfile reads; zip64 end records included)
    except (OSError, AttributeError, ValueError, zipfile.BadZipFile):
        return None
    if not end:
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL]), int(end[zipfile._ECD_SIZE])


def directory_problem(path: Path, members: int = MAX_MEMBERS) -> Optional[str]:
    """Why `path`'s central directory is not parsed (too many members, or too many bytes: a fragment that
    follows "it"), or None."""
    listed = zip_directory(path)
    if listed is None:
        return None
    count, size = listed
    if count > members or size > members * ENTRY_BYTES:
        return (f"has a zip directory of {count:,} members in {size:,} bytes, more than the {members:,} members "
                f"({members * ENTRY_BYTES:,} bytes) such a file holds")
    return None


def archive_hazard(infos: list, limit: Optional[int] = None, members=None) -> Optional[str]:
    """Why the archive whose directory is `infos` is not read (a fragment that follows "it"), or None: two
    members of one name; a member (of `members`, when given) that declares a decompression bomb; the `members` declaring
    more than `limit` bytes in all."""
    counts = Counter(info.filename for info in infos)
    twice = [member for member, n in counts.items() if n > 1]
    if twice:
        return (f"holds {counts[twice[0]]} members named {quoted(twice[0])}"
                f"{f' (and {len(twice) - 1:,} more names twice)' if len(twice) > 1 else ''}; zip readers differ "
                f"on which one they read (write each member once)")
    total = 0
    for info in infos:
        if members is not None and info.filename not in members:
            continue
        total += info.file_size
        inflates = info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
            MAX_INFLATED_BYTES, MAX_INFLATION * max(info.compress_size, 1))
        if inflates or (limit is not None and total > limit):
            return (f"has a member {quoted(info.filename)} that declares {info.file_size:,} bytes "
                    f"from {info.compress_size:,} stored" + (" (a decompression bomb?)" if inflates else
                                                            f", past the {limit:,} bytes in all that statistics need"))
    return None
