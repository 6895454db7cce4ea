"""Loaders bound their work by what a file could honestly hold: small files that declare gigabytes, huge
declared widths, shared nested lists, FIFOs and devices each end in a CheckpointError (or a problem
sentence) within a second or two, before any bounded read (test_loader_isolation.py)."""

from __future__ import annotations

import io
import os
import re
import threading
import time
import zipfile

import numpy as np
import pytest
import torch

from ckpt_factory import checkpoint_dict, make_plain_run, write_checkpoint
from fusedvq.checkpoint import CheckpointError, declare, diagnose, load_feature_spec


def finishes(fn, seconds: float = 5.0):
    """fn()'s result or exception, failing the test (instead of hanging it) past `seconds`."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    return box, time.monotonic() - start


def _deflated_zeros(archive: zipfile.ZipFile, name: str, nbytes: int, header: bytes = b"") -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with archive.open(info, "w", force_zip64=True) as f:
        f.write(header)
        chunk = bytes(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(chunk)


def _npy_header(shape) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_reads_only_the_statistics_keys(tmp_path):
    """A deflated array under a key nobody uses is never read (it declares 3 GB; only its header exists)."""
    parts = make_plain_run(D=20, K=12, num_categories=2)
    write_checkpoint(tmp_path, parts, stats_in_file=False, stats_beside=True)
    folder = tmp_path
    npz = folder / "normalization_stats.npz"
    with zipfile.ZipFile(npz, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("unused_blob.npy", _npy_header((402_653_184,)))  # 3 GB declared, never present
    box, took = finishes(lambda: load_feature_spec(folder))
    assert "error" not in box, box.get("error")
    assert took < 3


def test_npz_statistics_member_that_inflates_is_refused(tmp_path):
    parts = make_plain_run(D=20, K=12, num_categories=2)
    write_checkpoint(tmp_path, parts, stats_in_file=False)
    folder = tmp_path
    npz = folder / "normalization_stats.npz"
    with zipfile.ZipFile(npz, "w") as archive:
        _deflated_zeros(archive, "bomb_mean.npy", 200 << 20, _npy_header((26_214_400,)))
        _deflated_zeros(archive, "bomb_std.npy", 1 << 20, _npy_header((131_072,)))
    assert npz.stat().st_size < 2 << 20
    box, took = finishes(lambda: diagnose(folder))
    assert "error" not in box, box.get("error")
    assert any("bomb_mean.npy" in p and "declares" in p for p in box["value"]), box["value"]


def test_npz_array_whose_header_declares_more_than_it_holds_is_refused(tmp_path):
    """numpy allocates what an .npy header declares before it reads: a header that declares 80 GB over 80
    bytes of data is refused from the header (a sentence, not a MemoryError)."""
    path = tmp_path / "normalization_stats.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("c_mean.npy", "c_std.npy"):
            archive.writestr(name, _npy_header((10**10,)) + bytes(80))
    with pytest.raises(CheckpointError, match=r"'c_mean' whose header declares shape \(10000000000,\)") as info:
        load_feature_spec(stats=str(path), feature_mask=np.ones(3, bool), group_indices={"c": [0, 1, 2]})
    assert "MemoryError" not in str(info.value)


def test_pt_record_that_inflates_is_refused(tmp_path):
    """A .pt whose storage record inflates far beyond the file: refused from the zip directory alone."""
    good = tmp_path / "good.pt"
    torch.save(checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2)) | {"w": torch.zeros(4)}, good)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w") as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                _deflated_zeros(dst, info.filename, 200 << 20)
            else:
                dst.writestr(info, src.read(info))
    assert bomb.stat().st_size < 2 << 20
    box, _ = finishes(lambda: load_feature_spec(bomb))
    assert isinstance(box.get("error"), CheckpointError), box
    assert "declares" in str(box["error"]) and "data/0" in str(box["error"])


@pytest.mark.parametrize("input_dim", [500_000_000, 10**12])
def test_huge_input_dim_is_a_problem_not_a_memory_error(tmp_path, input_dim):
    parts = make_plain_run(D=20, K=12, num_categories=2)
    data = checkpoint_dict(parts)
    data["model_config"]["input_dim"] = input_dim
    torch.save(data, tmp_path / "best_model.pt")
    box, took = finishes(lambda: diagnose(tmp_path))
    assert "error" not in box, box.get("error")
    assert any(str(input_dim) in p for p in box["value"]) and took < 3


def test_feature_mask_of_shared_nested_lists_is_refused(tmp_path):
    inner = [True] * 1000
    mid = [inner] * 1000
    data = checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2))
    data["feature_mask"] = [mid] * 1000  # 10^9 entries from a few KB
    path = tmp_path / "best_model.pt"
    torch.save(data, path)
    assert path.stat().st_size < 64 << 10
    box, took = finishes(lambda: declare(path))
    assert "error" not in box, box.get("error")
    assert any("feature_mask" in p and "nested list" in p for p in box["value"].problems)
    assert took < 3


def test_feature_mask_nested_too_deeply_is_a_problem():
    """A pickle loads lists of any depth without recursion; fusedvq's sizing of them must not overflow
    Python's stack either (torch.save cannot write one this deep, so the list is handed over directly)."""
    from fusedvq.checkpoint.errors import _Problem
    from fusedvq.checkpoint.values import _parse_mask

    deep = [True]
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(_Problem, match="nested too deeply"):
        _parse_mask(deep)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_named_like_a_statistics_file_is_skipped_or_refused(tmp_path):
    write_checkpoint(tmp_path, make_plain_run(D=20, K=12, num_categories=2), stats_in_file=False)
    folder = tmp_path
    os.mkfifo(folder / "normalization_stats_2.npz")
    box, _ = finishes(lambda: diagnose(folder))
    assert "error" not in box
    box, _ = finishes(lambda: diagnose(folder, stats=folder / "normalization_stats_2.npz"))
    assert "error" not in box and any("FIFO" in p for p in box["value"]), box
    os.mkfifo(tmp_path / "pipe.pt")
    box, _ = finishes(lambda: load_feature_spec(tmp_path / "pipe.pt"))
    assert isinstance(box.get("error"), CheckpointError) and "FIFO" in str(box["error"])


@pytest.mark.parametrize("path, words", [
    ("/dev/null", "character device"),
    ("empty", "empty (0 bytes)"),
    ("text", "neither a zip archive"),
])
def test_odd_files_are_checkpoint_errors(tmp_path, path, words):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text").write_text("feature_mask = 1, 0, 1\n")
    target = path if path.startswith("/") else tmp_path / path
    with pytest.raises(CheckpointError, match=re.escape(words)):
        load_feature_spec(target)
