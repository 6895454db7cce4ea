"""Triton kernels for fusedvq (installed as fusedvq.kernels); they import nothing from fusedvq.

    plan.py         the host's side of a launch, with no triton import at the top (fusedvq's host code reads
                    it on CPU-only installs): the mode codes, the Mode record, the column map, the scale of a
                    reduction
    tiles.py        the pieces every kernel shares: the @triton.jit tile helpers, and on the host the launch
                    shapes (TUNING) and the scratch memory of the last-program reductions
    masked_mse.py   the forward and backward kernels of the loss and clean_features
    launchers.py    KernelLauncher (a launch with little host work), the launches of masked_mse.py's kernels,
                    and the entry points of norm "none" / "stats"
    batch_norm.py  norm="batch": the column-moments and dz-sums kernels, their launches, its entry points
    row_loads.py    a candidate forward (not the default): whole rows in 128-bit loads, gathered in the SM
    partials.py     P partial reconstructions against one target: their kernels, launches and entry points

The entry points below are imported on first use (they import triton).
"""

_ENTRY_POINTS = {
    "masked_mse_forward": "launchers", "masked_mse_backward": "launchers", "clean_forward": "launchers",
    "clean_backward": "launchers", "batch_mse_forward": "batch_norm", "batch_mse_backward": "batch_norm",
    "batch_clean_forward": "batch_norm", "batch_clean_backward": "batch_norm",
    "rows_fit": "row_loads", "rows_forward": "row_loads",
    "TUNING": "tiles",  # (the launch shapes and the forward's loads: ops/loss.py reads forward_loads)
}


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_ENTRY_POINTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = sorted(_ENTRY_POINTS)
