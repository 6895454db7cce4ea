"""Test-wide set-up, shared by tests/ and bench/.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, before any test module imports fusedvq.kernels.

torch.compile's on-disk caches go to a folder named after a hash of fusedvq's sources: their keys do not
cover a custom op's fake implementation, so a cache left by another version of fusedvq could replay graphs
with that version's output shapes; the same sources share one cache from run to run.
"""

import hashlib
import os
import tempfile
from pathlib import Path


def _sources_hash() -> str:
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("fusedvq/**/*.py"), *root.glob("kernels/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fusedvq-inductor-{_sources_hash()}"))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


GPU_REASON = "needs a CUDA GPU"


def pytest_addoption(parser):
    parser.addoption("--sweeps", action="store_true", default=os.environ.get("FUSEDVQ_SWEEPS") == "1",
                     help="also run the longer sweeps (tests marked sweep; also FUSEDVQ_SWEEPS=1): docs/testing.md")


def pytest_collection_modifyitems(config, items):
    """The sweep-marked cases run with --sweeps only (deselected otherwise: the default suite covers each
    behaviour at a smaller size). Without CUDA the gpu-marked cases are not run: one per file is reported as
    skipped, saying why and how many, and the file's others are deselected (not hundreds of identical skips)."""
    if not config.getoption("--sweeps"):
        _deselect(config, items, [item for item in items if "sweep" in item.keywords])
    if torch.cuda.is_available():
        return
    by_file: dict = {}
    for item in items:
        if "gpu" in item.keywords:
            by_file.setdefault(item.path, []).append(item)
    dropped = []
    for path, cases in by_file.items():
        first, *rest = cases
        count = f"{len(cases)} case{'s' if len(cases) > 1 else ''} of this file"
        first.add_marker(pytest.mark.skip(reason=f"{GPU_REASON} ({count}; bench/gpu_check.sh runs them on one)"))
        dropped += rest
    _deselect(config, items, dropped)


def _deselect(config, items, dropped):
    if dropped:
        gone = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in gone]
        config.hook.pytest_deselected(items=dropped)
