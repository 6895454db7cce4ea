"""Triton kernels for fusedvq (installed as fusedvq.kernels); they import nothing from fusedvq.

    plan.py         the mode codes and the Mode record the host hands the kernels (no triton: importable
                    on CPU-only installs, where fusedvq's host code reads the codes)
    masked_mse.py   the forward and backward kernels of the loss and clean_features, and the tile pieces
    batch_stats.py  norm="batch": the column-moments and dz-sums kernels, and its entry points
    launchers.py    the launches of masked_mse.py's kernels, and the entry points of norm "none" / "stats"
    launch.py       launching with little host work, launch shapes (TUNING), scratch memory

The entry points below are imported on first use (they import triton).
"""

_ENTRY_POINTS = {
    "masked_mse_forward": "launchers", "masked_mse_backward": "launchers", "clean_forward": "launchers",
    "clean_backward": "launchers", "batch_mse_forward": "batch_stats", "batch_mse_backward": "batch_stats",
    "batch_clean_forward": "batch_stats", "batch_clean_backward": "batch_stats",
}


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = sorted(_ENTRY_POINTS)
