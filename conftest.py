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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
