"""Test-wide set-up, shared by tests/ and bench/.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter, which must be
switched on before triton is first imported: hence here, before any test module imports fusedvq.kernels.

torch.compile's on-disk caches go to a fresh folder per run: their keys do not cover a custom op's fake
implementation, so a cache left by an older fusedvq can replay graphs with the old output shapes.
"""

import atexit
import os
import shutil
import tempfile

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedvq-inductor-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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
