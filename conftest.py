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
# The suite's inductor builds are a few small C++ kernels: precompiling inductor's common header first costs
# more (10 s of a core on an empty cache) than it saves them.
os.environ.setdefault("TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _skip_nested_language_patches() -> None:
    """Triton's interpreter patches triton.language for each launch (GridExecutor.__call__ -> _patch_lang,
    undone when the grid is done) and again on every call of a @triton.jit helper inside it
    (InterpretedFunction.__call__ -> _patch_lang: a scan of the language's modules, about a millisecond a
    call, a third of the interpreted tests' time). Inside a launch that has patched the modules a helper
    sees, the helper's patch changes nothing (the builtins are already replaced; the rest is set to the same
    functions again, and the launch's own undo restores every attribute either way), so it is skipped; a
    helper that sees another module is patched as before. Nothing else changes: no result depends on it."""
    try:
        import inspect
        import threading

        import triton.language as tl
        from triton.runtime import interpreter
        patch_lang, run_grid = interpreter._patch_lang, interpreter.GridExecutor.__call__
        empty = interpreter._LangPatchScope
    except (ImportError, AttributeError):  # another triton: its interpreter as it is
        return
    launching, local = object(), threading.local()

    def languages(fn) -> set:  # the modules _patch_lang patches for fn
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}

    def patch_once(fn):
        patched = getattr(local, "patched", None)
        if patched is launching:  # the launch's own patch, in full
            scope = patch_lang(fn)
            local.patched = languages(fn)
            return scope
        if patched is not None and languages(fn) <= patched:
            return empty()  # a helper inside the launch: its modules are patched already
        scope = patch_lang(fn)
        if patched is not None:
            patched |= languages(fn)
        return scope

    def launch(self, *args, **kwargs):
        outer, local.patched = getattr(local, "patched", None), launching
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            local.patched = outer

    interpreter._patch_lang, interpreter.GridExecutor.__call__ = patch_once, launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _skip_nested_language_patches()


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


@pytest.fixture(scope="session")
def warm_python(tmp_path_factory):
    """An executable that stands in for python (tests/warm_python.py: each command runs in a child forked
    from one interpreter that imported torch and fusedvq), its server running for the session: the tests
    that start `python` (the GPU script's dry run, the command line, the demo, the gloo ranks) pay torch's
    import once per test process instead of at every start."""
    import subprocess
    import sys
    import time

    script = Path(__file__).resolve().parent / "tests" / "warm_python.py"
    folder = tmp_path_factory.mktemp("warm")
    sock = folder / "python.sock"
    server = subprocess.Popen([sys.executable, str(script), "serve", str(sock)], stdin=subprocess.DEVNULL)
    client = folder / "python"
    client.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" run "{sock}" "$@"\n')
    client.chmod(0o755)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the warm interpreter did not start"
            time.sleep(0.05)
        yield client
    finally:
        server.terminate()
        server.wait(30)
