"""Backend/device parameters, the one parity check every parity test calls, and what the error tests share."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import fusedvq
from oracle import TOLERANCE, oracle, rel_err

interpreting = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (backend, device): the reference everywhere, the Triton kernels on CUDA and, through the interpreter, on CPU.
BACKENDS = [
    pytest.param(("reference", "cpu"), id="reference-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter", marks=needs_interpreter),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("reference", "cuda"), id="reference-cuda", marks=pytest.mark.gpu),
]

# Rows of the interpreter's cases: 9 tiles of 8 rows (forward; 17 of 4 backward) over its 8 programs, so a
# program walks two tiles and the last tile is a one-row tail. Larger batches only repeat those loops, one
# program after another: they run as sweeps (--sweeps), on the PyTorch path in the default suite.
INTERPRETER_ROWS = 65


def interpreted(backend_device) -> bool:
    """Whether (backend, device) runs the Triton kernels through the interpreter."""
    return tuple(backend_device) == ("triton", "cpu")


def backend_cases(rows, *, sweep=lambda backend_device, *row: False, exists=lambda backend_device, *row: True):
    """Parameters (backend_device, *row) for each backend of BACKENDS and each row (a tuple of values) where
    `exists` holds, ids "ROW-BACKEND"; the cases `sweep` picks carry the sweep mark (not in the default suite)."""
    cases = []
    for backend in BACKENDS:
        for row in rows:
            if not exists(backend.values[0], *row):
                continue
            marks = [*backend.marks, *([pytest.mark.sweep] if sweep(backend.values[0], *row) else [])]
            cases.append(pytest.param(backend.values[0], *row, marks=marks,
                                      id="-".join([*map(str, row), backend.id])))
    return cases


def check_parity(backend, device, x, r, columns, mean_raw, std_raw, *, stats="raw", nan_to_num=False,
                 reduction="mean", norm="stats", dtype=None, call=None):
    """Run fusedvq on (x, r) and compare loss, grad_x and grad_r with the float64 oracle.

    x, r are given on the CPU in their final dtype and layout; stats="masked" passes μ, σ gathered to K.
    """
    dtype = dtype or x.dtype
    x = x.to(device).requires_grad_()
    r = r.to(device).requires_grad_()
    grad_shape = (x.shape[0], r.shape[1]) if reduction == "none" else ()
    grad_out = (torch.rand(grad_shape, dtype=torch.float64) + 0.5) * 1.7  # ≠ 1
    if norm == "stats":
        if stats == "masked":
            idx = columns.nonzero().squeeze(1) if columns.dtype == torch.bool else columns
            mean, std = mean_raw[idx], std_raw[idx]
        else:
            mean, std = mean_raw, std_raw
    else:
        mean = std = None
    kwargs = dict(norm=norm, nan_to_num=nan_to_num, reduction=reduction, backend=backend)
    if norm == "stats" and x.shape[1] == r.shape[1]:
        kwargs["stats_space"] = stats  # D == K: the length cannot tell raw from masked
    if call is None:
        loss = fusedvq.masked_mse(x, r, columns, mean, std, **kwargs)
    else:
        loss = call(x, r, columns, mean, std, **kwargs)
    loss.backward(grad_out.to(loss.dtype).to(device))
    ref_loss, ref_gx, ref_gr = oracle(
        x, r, columns, mean_raw if norm == "stats" else None, std_raw if norm == "stats" else None, grad_out,
        nan_to_num=nan_to_num, reduction=reduction,
    )
    tol = TOLERANCE[dtype]
    assert loss.dtype == x.dtype and loss.shape == ref_loss.shape
    assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
    assert r.grad.dtype == r.dtype and r.grad.shape == r.shape
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all() and torch.isfinite(r.grad).all()
    errs = {"loss": rel_err(loss, ref_loss), "grad_x": rel_err(x.grad, ref_gx), "grad_r": rel_err(r.grad, ref_gr)}
    assert all(e <= tol for e in errs.values()), f"relative errors {errs} exceed {tol} for {dtype}"
    return loss, x.grad, r.grad


def run_compiler_check(script: str, *args: str) -> list[dict]:
    """Run tests/<script> with args in a fresh process without TRITON_INTERPRET (which would replace the
    kernels by interpreted functions) and return the JSON records it prints, one per line.

    A compile takes seconds to minutes, so its records are kept in the temporary folder under a hash of what
    decides them (the script and its args, the kernels' sources, triton's version, which bundles ptxas, the
    FUSEDVQ_ settings): a run with the same sources reads them back; any change to them compiles afresh."""
    here = Path(__file__).resolve().parent
    cache = Path(tempfile.gettempdir()) / f"fusedvq-aot-{_compiler_check_key(here / script, args)}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, str(here / script), *args], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(records))
    partial.replace(cache)  # atomic: a concurrent run reads the whole file or none
    return records


def _compiler_check_key(script: Path, args: tuple) -> str:
    import importlib.util

    import triton

    kernels = Path(importlib.util.find_spec("fusedvq.kernels").origin).resolve().parent  # (not imported here)
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("FUSEDVQ_"))  # e.g. the TUNING switches
    digest = hashlib.sha256(f"{triton.__version__}\n{sys.version}\n{settings}\n{args}".encode())
    for path in [script, *sorted(kernels.glob("*.py"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def force_blocked(monkeypatch, block_rows: int, num_kept: int) -> None:
    """The CPU blocked passes at any B, in blocks of block_rows rows of num_kept columns: no composition, no
    small-batch route."""
    from fusedvq import ops
    from fusedvq.cpu import blocked, small

    monkeypatch.setattr(ops, "_COMPOSED_MAX_ELEMENTS", 0)
    monkeypatch.setattr(ops, "_GAP_COMPOSED_MAX_ELEMENTS", 0)
    monkeypatch.setattr(small, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(blocked, "_BLOCK_ELEMENTS", block_rows * num_kept)


def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


def run_check(*args, **kwargs) -> tuple[int, str, str]:
    """`fusedvq check ARGS` in this process: (exit code, stdout, stderr), never a traceback."""
    from fusedvq.tools.cli import check

    out, err = io.StringIO(), io.StringIO()
    rc = check(*map(str, args), out=out, err=err, **kwargs)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return rc, out.getvalue(), err.getvalue()
