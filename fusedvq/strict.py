"""The kinds of the public options, checked, never coerced: a flag is True or False, a count an integer, a
choice one of its strings, a keyword one the form takes, a tensor argument a dense constant tensor or
numbers, an index a bool mask or integer column indices (not a mask given as numbers, nor a FeatureSpec),
from_checkpoint's arguments before the file is read (load_spec). Each refusal is a TypeError or ValueError
naming the argument and the value it got (a string "False" read from a config file must not be truthy; 10.0
or "10" must not pass for a width).
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .kernels.plan import Gap

if TYPE_CHECKING:  # (the checkpoint package imports this module)
    from .checkpoint import FeatureSpec

# Keywords that other losses spell differently (F.mse_loss's legacy arguments, a mask's usual name).
_SPELLED_ELSEWHERE = {"reduce": ("reduction",), "size_average": ("reduction",), "mask": ("index", "feature_mask"),
                      "gap": ("target_gap",), "weights": ("weight",), "num_columns": ("num_features",),
                      "sync": ("sync_stats",), "group": ("process_group",),
                      "normalization": ("norm",), "normalize": ("norm",)}


def check_flag(name: str, value) -> bool:
    """value as a bool: True / False, or a numpy bool; anything else (1, "False", None) is a TypeError."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_count(name: str, value, minimum: int = 0) -> int:
    """value as an int >= minimum: a Python or numpy integer (not a bool, a float such as 10.0, or a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer (a Python int such as 187), got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {int(value)}")
    return int(value)


def option_code(name: str, value, choices: tuple[str, ...]) -> int:
    """The position of value among choices (its code), or a ValueError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name}={value!r}: expected one of {', '.join(map(repr, choices))}")
    return choices.index(value)


def check_eps(eps) -> float:
    """eps as a float: a plain real number, finite and >= 0 (it is a kernel argument, so a string or a
    tensor would fail inside a launch)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a number (a Python float such as 1e-8), got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def refuse_unknown(given, valid: tuple[str, ...], form: str) -> None:
    """A TypeError for the first keyword of `given` that `form` does not take, listing all it takes and
    pointing a near miss (reduce → reduction) at its name."""
    unknown = [name for name in given if name not in valid]
    if not unknown:
        return
    name = unknown[0]
    near = [n for n in _SPELLED_ELSEWHERE.get(name, ()) if n in valid] or difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {near[0]}=?)" if near else ""
    raise TypeError(f"unknown option {name!r}{hint}: {form} takes {', '.join(valid)}")


def as_tensor(value, name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A tensor argument (an index, statistics, weights) as a tensor on `device`: a dense tensor that does not
    require grad (fusedvq treats it as a constant), or numbers torch.as_tensor takes."""
    if isinstance(value, torch.Tensor):
        check_dense(value, name)
        if value.requires_grad:
            raise ValueError(f"{name} requires grad, but fusedvq treats it as a constant: pass {name}.detach()")
        return value.to(device=device, dtype=dtype) if dtype is not None else value.to(device)
    try:
        return torch.as_tensor(value, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise not_numbers(name, value, err) from None


def not_numbers(name: str, value, err: Exception) -> TypeError:
    """The error for a value that is not a tensor, array or sequence of numbers (said only when it fails): a
    FeatureSpec given where a mask belongs says how to use it."""
    from .checkpoint import FeatureSpec  # (the error path only: no call imports or runs it otherwise)

    if isinstance(value, FeatureSpec):
        return TypeError(f"{name} is a FeatureSpec (a checkpoint's whole description), not a mask or indices: build "
                         f"the module with .from_spec(spec), or pass spec.feature_mask (and spec.mean, spec.std with "
                         f"stats_space='masked')")
    return TypeError(f"{name} must be a tensor, array or sequence of numbers: {err}")


def check_gap(target_gap, num_kept: int) -> Gap:
    """target_gap=(at, width) as a Gap, with 0 <= at <= K and width >= 0 (Python or numpy integers), or a
    ValueError naming them."""
    ok = (isinstance(target_gap, (tuple, list)) and len(target_gap) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in target_gap))
    if not ok or not 0 <= target_gap[0] <= num_kept or target_gap[1] < 0:
        raise ValueError(f"target_gap must be (at, width) with 0 <= at <= {num_kept} (the kept columns) and "
                         f"width >= 0, got {target_gap!r}")
    return Gap(int(target_gap[0]), int(target_gap[1]))


def check_dense(t: torch.Tensor, name: str, meta: bool = True) -> None:
    """A dense (strided) tensor with data: sparse and nested tensors, and tensors on the meta device, are not
    supported by the loss's kernels."""
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor, which fusedvq does not support: pass a dense [rows, columns] "
                        f"tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor ({str(t.layout).replace('torch.', '')}), which fusedvq does not "
                        f"support: pass {name}.to_dense()")
    if meta and t.device.type == "meta" and not torch.compiler.is_compiling():
        raise ValueError(f"{name} is on the meta device (a shape without values): fusedvq needs real data")


def index_tensor(index, device: torch.device, num_features: Optional[int]) -> torch.Tensor:
    """The index as a 1-D tensor on `device`: a bool mask, or integer column indices (not a mask given as
    numbers). The one check of an index's kind, for the functional forms and the modules' constructors
    alike, so both give the same errors. num_features: D, or None when not known yet (a constructor given
    integers without num_features): an index of 0s and 1s is then taken to be length D."""
    index = as_tensor(index, "index", device)
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D (a bool mask [D] or column indices [K]), got shape {tuple(index.shape)}")
    if index.dtype == torch.bool:
        return index
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.uint8:
        raise TypeError(
            f"index must be a bool mask or integer column indices, got {index.dtype} ({index.shape[0]} entries): "
            f"pass mask.bool() for a mask; column indices must be int32 or int64"
        )
    if index.shape[0] == 0:
        raise ValueError("index is empty: it must name at least one feature column")
    if not torch.compiler.is_compiling():
        _refuse_integer_mask(index, index.shape[0] if num_features is None else num_features)
    return index


def _refuse_integer_mask(index: torch.Tensor, num_features: int) -> None:
    """An integer index of length D >= 3 holding only 0s and 1s is a mask given as numbers: read as indices
    it would be another loss (columns 0 and 1 over and over). For D <= 2 the two readings cannot be told
    apart, and integers are indices, as everywhere else."""
    if index.shape[0] != num_features or num_features < 3:
        return
    if bool(((index == 0) | (index == 1)).all()):
        raise ValueError(
            f"index has {num_features} entries, one per feature column, holding only 0s and 1s: that is a "
            f"mask given as integers, which would be read as column indices (a different loss); pass "
            f"mask.bool()"
        )


def check_spec(cls, spec) -> None:
    """from_spec's argument is a FeatureSpec, or a TypeError saying what to pass."""
    from .checkpoint import FeatureSpec  # (a constructor's check: the calls never run it)

    if not isinstance(spec, FeatureSpec):
        raise TypeError(f"{cls.__name__}.from_spec takes a FeatureSpec (from fusedvq.load_feature_spec), got "
                        f"{type(spec).__name__}: for a checkpoint file use {cls.__name__}.from_checkpoint(path), for a "
                        f"mask and statistics the constructor {cls.__name__}(feature_mask, mean, std, ...)")


def refuse_spec(value, name: str, instead: str) -> None:
    """A FeatureSpec given where a mask belongs: say to build the module from it."""
    from .checkpoint import FeatureSpec  # (a constructor's check: the calls never run it)

    if isinstance(value, FeatureSpec):
        raise TypeError(f"{name} is a FeatureSpec (a checkpoint's whole description), not a mask or indices: use "
                        f"{instead}, or pass spec.feature_mask")


def load_spec(cls, path, norm: str, num_features: Optional[int], trust: bool, stats) -> FeatureSpec:
    """The FeatureSpec a module `cls` with this `norm` needs from a checkpoint (statistics only for "stats"),
    its flag and count checked before the file is touched."""
    from .checkpoint import FeatureSpec, load_feature_spec  # (a constructor's: the calls never run it)

    trust = check_flag("trust", trust)
    if num_features is not None:
        num_features = check_count("num_features", num_features, minimum=1)
    if isinstance(path, FeatureSpec):
        raise TypeError(f"{cls.__name__}.from_checkpoint takes a checkpoint path, got a FeatureSpec: pass it to "
                        f"{cls.__name__}.from_spec(spec)")
    return load_feature_spec(path, num_features=num_features, trust=trust, stats=stats, require_stats=norm == "stats")
