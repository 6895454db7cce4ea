"""The combinatorial differential test: cases drawn from the whole option space (tests/combinations.py; P partial
reconstructions against one target: tests/combinations_partials.py, a quarter of the draws) against the
float64 oracle — first a fixed list of known-critical combinations, then random draws until the time budget
is spent.

    FUSEDVQ_COMBO_SECONDS=600 pytest tests/test_combinations.py     # draw for 10 minutes (default: 8 s)
    FUSEDVQ_COMBO_SEED=1234 pytest tests/test_combinations.py -k random   # replay drawn cases (comma-separated)
    FUSEDVQ_COMBO_BASE=77 ...                                      # the first seed of the draws (default: random)

A failure names each failing case by its seed and its Case(...), which `run(Case(...))` below replays as it
stands (a critical case's id names it too)."""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from unittest import mock

import pytest
import torch

from combinations import Case, build, change, draw, make_data, route_limit_rows
from combinations_checks import backward, check_grads, close, modes
from combinations_partials import draw_partials, run_partials
from fusedvq import ops
from fusedvq.cpu import small as cpu_small
from fusedvq.cpu import blocked as cpu_blocked
from helpers import interpreting
from oracle import TOLERANCE, category_oracle, hybrid_oracle, kept_z, weighted_oracle

BUDGET_S = float(os.environ.get("FUSEDVQ_COMBO_SECONDS", "8"))
REPLAY = [int(s) for s in os.environ.get("FUSEDVQ_COMBO_SEED", "").split(",") if s.strip()]
K_REAL = 171

CRITICAL = {
    # target_gap with per-column errors or weights: the blocked CPU path (limits lowered, several blocks) ...
    "column-gap-blocked": Case(seed=11, reduction="column", gap=(9, 3), shape=(13, 40, 30), limit_rows=4,
                               block_rows=2),
    "weighted-mean-gap-blocked": Case(seed=12, reduction="mean", weight="tensor", gap=(0, 2), shape=(13, 40, 30),
                                      limit_rows=4, block_rows=3),
    "column-gap-batch-blocked": Case(seed=13, norm="batch", reduction="column", weight="balanced", gap=(30, 4),
                                     shape=(13, 40, 30), limit_rows=4, block_rows=2),
    # ... at the real limit (B·K just above 2^16), and under torch.compile at a small B
    "column-gap-real-limit": Case(seed=14, form="recon", reduction="column", gap=(100, 16),
                                  shape=(route_limit_rows("stats", True, K_REAL) + 1, 187, K_REAL)),
    "column-gap-compiled": Case(seed=15, compiled="aot_eager", reduction="column", gap=(5, 3), shape=(4, 12, 7)),
    # category errors after the weight buffer changed in place / was reassigned
    "category-weights-in-place": Case(seed=21, reduction="column", weight="named", change="weight_inplace",
                                      grads=(True, False)),
    "category-weights-reassigned": Case(seed=22, form="recon", reduction="column", weight="tensor",
                                        change="weight_reassign"),
    "balanced-repeated-column": Case(seed=23, reduction="column", weight="balanced", repeats=True),
    "stats-swapped": Case(seed=24, change="stats_swap", reduction="none"),
    "index-swapped": Case(seed=25, form="recon", change="index_swap", selector="duplicates", stats_space="masked"),
    # autocast: float32 compute and result, mixed dtypes accepted
    "autocast-batch-float32": Case(seed=31, norm="batch", autocast=True, shape=(64, 187, K_REAL)),
    "autocast-batch-blocked": Case(seed=32, norm="batch", autocast=True, reduction="column", shape=(9, 40, 30),
                                   limit_rows=3, block_rows=2),
    "autocast-bf16-inputs": Case(seed=33, form="functional", autocast=True, dtype="bfloat16"),
    "autocast-mixed": Case(seed=34, autocast=True, dtype="bfloat16", target_dtype="float32"),
    "autocast-clean-batch": Case(seed=35, form="clean_features", norm="batch", autocast=True, grads=(True, False)),
    # each route on both sides of its limit, other forms, layouts and modes
    "batch-small-route-edge": Case(seed=41, norm="batch", nan_to_num=True, shape=(4, 40, 30), limit_rows=4),
    "batch-blocked-edge": Case(seed=42, norm="batch", nan_to_num=True, shape=(5, 40, 30), limit_rows=4,
                               block_rows=2, selector="duplicates"),
    "float64-cleaner-gap": Case(seed=43, form="cleaner", dtype="float64", reduction="column", weight="named",
                                gap=(2, 3), layout=("transposed", "slice")),
    "no-grad-bf16": Case(seed=44, form="functional", dtype="bfloat16", grad_mode="no_grad", reduction="sum"),
    # the hybrid objective (embeddings on the gap's columns) on the blocked path, weighted, and compiled
    "hybrid-column-blocked": Case(seed=46, reduction="column", weight="tensor", gap=(9, 3), shape=(13, 40, 30),
                                  limit_rows=4, block_rows=2, embed=True),
    "hybrid-batch-cleaner": Case(seed=47, form="cleaner", norm="batch", reduction="mean", gap=(2, 3), embed=True,
                                 selector="mask"),
    "hybrid-compiled": Case(seed=48, form="recon", compiled="aot_eager", reduction="sum", gap=(5, 3),
                            shape=(4, 12, 7), embed=True),
    # P partial reconstructions: the hybrid objective on the blocked passes (a list read in place), its small
    # route, compiled, under autocast, the interpreter's kernels; the feature columns alone around a gap
    "partials-hybrid-list-blocked": Case(seed=51, form="partials_module", reduction="column", gap=(4, 3),
                                         shape=(13, 40, 30), limit_rows=4, block_rows=2, embed=True, partials=6,
                                         listed=True, grads=(True, True, True), layout=("slice", "transposed")),
    "partials-hybrid-batch-small": Case(seed=52, form="partials", norm="batch", dtype="float64", gap=(0, 2),
                                        shape=(5, 12, 7), embed=True, partials=3, grads=(True, False, True)),
    "partials-hybrid-compiled": Case(seed=53, form="partials_module", compiled="aot_eager", reduction="column",
                                     gap=(7, 2), shape=(4, 12, 7), embed=True, partials=3, grads=(True, True, True)),
    "partials-hybrid-autocast": Case(seed=54, form="partials", autocast=True, dtype="bfloat16", gap=(2, 3),
                                     embed=True, partials=24, shape=(9, 40, 30), grads=(True, True, True)),
    "partials-gap-column-float64": Case(seed=55, form="partials_module", dtype="float64", reduction="column",
                                        gap=(5, 4), partials=6, listed=True, grads=(True, True, False)),
    "partials-hybrid-triton": pytest.param(
        Case(seed=56, form="partials_module", backend="triton", reduction="column", gap=(3, 2), shape=(5, 12, 7),
             embed=True, partials=3, grads=(True, True, True), layout=("transposed", "slice")),
        marks=pytest.mark.skipif(not interpreting, reason="no interpreter")),
    "triton-gap-column": pytest.param(
        Case(seed=45, backend="triton", reduction="column", gap=(3, 2), weight="tensor", shape=(5, 12, 7),
             layout=("slice", "transposed")), marks=pytest.mark.skipif(not interpreting, reason="no interpreter")),
}


# Sequences the sweep found, each case fine alone: the later one is a recompile of the same compiled call.
CRITICAL_SEQUENCES = {
    # the recompile traces symbolic widths: the weight's length was compared with a tuple's `in`
    "recompiled-weighted-autocast": [
        Case(seed=8685401, form="functional", compiled="aot_eager", reduction="none", weight="tensor",
             dtype="float64", layout=("transposed", "contiguous"), grads=(False, True), shape=(6, 12, 7),
             limit_rows=6, block_rows=3),
        Case(seed=8685576, form="functional", compiled="aot_eager", norm="none", reduction="none", weight="tensor",
             target_dtype="bfloat16", autocast=True, layout=("transposed", "contiguous"), grads=(False, True),
             shape=(6, 12, 7), selector="index", limit_rows=6, block_rows=2)],
    # a traced mask's K is known on the device only: the small-batch route's size checks guarded on it (a
    # guard of dynamo's: with aot_eager the code before the fix fails as with inductor)
    "compiled-clean-mask-past-the-route": [
        Case(seed=8685513, form="clean_features", compiled="aot_eager", norm="batch", reduction="none",
             dtype="bfloat16", layout=("slice", "contiguous"), grads=(True, False), shape=(96, 187, 171))],
}


@pytest.mark.parametrize("cases", list(CRITICAL_SEQUENCES.values()), ids=list(CRITICAL_SEQUENCES))
def test_critical_sequences(cases):
    torch._dynamo.reset()
    for i, case in enumerate(cases):
        try:
            run(case, fresh_compiler=i == 0)
        except Exception as err:
            raise AssertionError(f"{case!r}: {type(err).__name__}: {err}") from err


@pytest.mark.parametrize("case", list(CRITICAL.values()), ids=list(CRITICAL))
def test_critical_combinations(case):
    try:
        run(case)
    except Exception as err:
        raise AssertionError(f"{case!r}: {type(err).__name__}: {err}") from err


def test_random_combinations():
    """Draws until the budget is spent (or replays FUSEDVQ_COMBO_SEED); fails listing every failing seed."""
    base = int(os.environ.get("FUSEDVQ_COMBO_BASE", random.randrange(1 << 30)))
    seeds = REPLAY or range(base, base + (1 << 30))
    start, tried, failures = time.monotonic(), 0, {}
    for seed in seeds:
        if not REPLAY and time.monotonic() - start > BUDGET_S:
            break
        case = draw_partials(seed) if random.Random(-seed).random() < 0.25 else draw(seed)
        left = BUDGET_S - (time.monotonic() - start)
        late = left < min(15, BUDGET_S / 2)
        if (case.backend == "triton" and not interpreting or case.compiled and not REPLAY and late
                or case.compiled == "inductor" and not REPLAY and BUDGET_S < 60):
            continue  # (a compile takes seconds: none starts in the last half of the budget or 15 s; inductor's
            # first C++ build in a process takes 10 s and more: drawn when the budget is a minute or more)
        tried += 1
        try:
            run(case)
        except Exception as err:  # grouped by the kind of failure, so one bug does not hide the others
            first = re.sub(r"\d[\d.e+-]*", "#", str(err).split("\n")[0])  # (numbers differ from case to case)
            kind = f"{type(err).__name__}: {first[:160]}"
            failures.setdefault(kind, []).append(case)
    if failures:
        total = sum(map(len, failures.values()))
        lines = [f"{total} of {tried} drawn cases failed (seeds from {base}; replay one with FUSEDVQ_COMBO_SEED=<seed>):"]
        for kind, cases in failures.items():
            lines.append(f"- {len(cases)}x {kind}\n    first: {cases[0]!r}\n    seeds: "
                         f"{','.join(str(c.seed) for c in cases[:12])}")
        pytest.fail("\n".join(lines), pytrace=False)


# ------------------------------------------------------------------------------------------------- one case


@contextlib.contextmanager
def _settings(case: Case):
    """The route limits (lowered to case.limit_rows rows of K) and Triton's forward loads of the case."""
    with contextlib.ExitStack() as stack:
        rows, K = case.limit_rows, case.shape[2]
        if rows:
            for owner, name in ((ops, "_COMPOSED_MAX_ELEMENTS"), (ops, "_GAP_COMPOSED_MAX_ELEMENTS"),
                                (cpu_small, "SMALL_ELEMENTS")):
                stack.enter_context(mock.patch.object(owner, name, rows * K))
        if case.block_rows:
            stack.enter_context(mock.patch.object(cpu_blocked, "_BLOCK_ELEMENTS", case.block_rows * K))
        if case.loads != "gather":
            from fusedvq.kernels import tiles

            stack.enter_context(mock.patch.object(tiles.TUNING, "forward_loads", case.loads))
        yield


def _reference(case: Case, d, grad_out, through_stats=True):
    """(result, grad_x, grad_target or None, grad_embeddings or None) of the float64 oracle."""
    mean_k, std_k = d.mean[d.idx], d.std[d.idx]
    if case.form == "clean_features":
        x64 = d.x.detach().double().requires_grad_()
        z = kept_z(x64, d.idx, mean_k, std_k, case.norm, nan_to_num=case.nan_to_num, through_stats=through_stats)
        return z.detach(), torch.autograd.grad(z, x64, grad_out)[0], None, None
    if case.embed:  # (statistics per kept column, spread over the feature columns for the oracle)
        mean, std = torch.zeros(case.shape[1], dtype=torch.float64), torch.ones(case.shape[1], dtype=torch.float64)
        mean[d.idx], std[d.idx] = mean_k, std_k
        return hybrid_oracle(d.x, d.r, d.e, d.idx, mean, std, grad_out, at=case.gap[0], norm=case.norm,
                             reduction=case.reduction, weight=d.w, nan_to_num=case.nan_to_num,
                             through_stats=through_stats)
    return (*weighted_oracle(d.x, d.r, d.idx, mean_k, std_k, grad_out, norm=case.norm, reduction=case.reduction,
                             weight=d.w, gap=case.gap, nan_to_num=case.nan_to_num, through_stats=through_stats), None)


def run(case: Case, fresh_compiler: bool = True) -> None:
    """Run one case against the oracle; AssertionError naming every difference. fresh_compiler=False: a compiled
    case reuses what dynamo holds (a recompile of the call before it)."""
    if case.partials:
        return run_partials(case, fresh_compiler)
    d = make_data(case)
    x, r = (t.detach().clone().requires_grad_(want) for t, want in zip((d.x, d.r), case.grads))
    x0, r0 = x.detach().clone(), r.detach().clone()
    e = None if d.e is None else d.e.detach().clone().requires_grad_(case.grads[1])  # (wanted with the target's)
    args = (x, r) if e is None else (x, r, e)
    try:
        call, module, owner = build(case, d)
    except ValueError as err:  # a category listing a column twice: refused, with a sentence naming it
        if case.repeats and "more than once" in str(err):
            return
        raise
    if case.compiled and fresh_compiler:  # (each compiled case from a clean slate: the forms' calls share
        torch._dynamo.reset()  # code objects, and a long sweep would reach dynamo's recompile limit)
    fn = torch.compile(call, backend=case.compiled, fullgraph=True) if case.compiled else call
    with _settings(case):
        if case.change != "none":
            with modes(case):
                fn(*args)
            change(case, d, module)
        with modes(case):
            out = fn(*args)
            cat = (owner.feature_category_errors(out) if owner is not None and case.reduction == "column"
                   and e is None else None)
        grad_out = backward(case, out)
    ref, ref_gx, ref_gr, ref_ge = _reference(case, d, grad_out)
    # norm="batch": grad_x is what is left of its terms after the projections on the batch's statistics (0 at
    # B = 2): measured against the size of those terms.
    floor = _reference(case, d, grad_out, False)[1].norm().item() if case.norm == "batch" else 0.0
    problems = []
    clean = case.form == "clean_features"
    low = {torch.float64: torch.float64}.get(x.dtype, torch.float32)
    want = ((low,) if not clean else (low, x.dtype)) if case.autocast else (x.dtype,)
    if out.dtype not in want:
        problems.append(f"result dtype {out.dtype}, expected {' or '.join(map(str, want))}")
    close("result", out, ref, TOLERANCE[out.dtype], problems)
    if cat is not None:
        close("category errors", cat, category_oracle(ref, d.categories, d.w), TOLERANCE[out.dtype], problems)
    wants_grad = case.grad_mode == "grad" and any(case.grads)
    if out.requires_grad != wants_grad:
        problems.append(f"result requires_grad={out.requires_grad}, expected {wants_grad}")
    inputs = [("grad_x", x, ref_gx, case.grads[0], floor), ("grad_target", r, ref_gr, case.grads[1], 0.0)]
    inputs += [("grad_embeddings", e, ref_ge, case.grads[1], 0.0)] if e is not None else []
    check_grads([(name, t.grad, t.dtype, ref_g, wanted, fl) for name, t, ref_g, wanted, fl in inputs], wants_grad,
                problems)
    for name, before, after in (("features", x0, x), ("target", r0, r)):
        if not torch.equal(before.nan_to_num(7.0), after.detach().nan_to_num(7.0)):
            problems.append(f"the call wrote into its {name}")
    assert not problems, "; ".join(problems)
