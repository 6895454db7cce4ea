"""The combinatorial differential test's partials cases: P partial reconstructions against one target
(fusedvq.partials_mse, PartialsMSELoss), stacked or as a list, P from 1 to 24, each norm, a hybrid gap with and
without embeddings, both reductions, the PyTorch path and the Triton kernels (the interpreter on CPU tensors),
eager and compiled, autocast, float64, layouts, which inputs want gradients, grad modes, B on either side of
the CPU's route limits; with categories, the level-averaged metric (decoder space with embeddings). A case is
tests/combinations.py's Case with partials = P > 0: `draw_partials(seed)` draws one that can exist (norm
"batch" with two rows or more, embeddings only with a gap, float64 only on the PyTorch path, categories only
where P = N·L), `run_partials` runs it against tests/oracle.py's partials oracles."""

from __future__ import annotations

import contextlib
import random
from unittest import mock

import torch

import fusedvq
from combinations import DTYPES, Case, Data, _categories, inputs
from combinations_checks import backward, check_grads, close, modes
from fusedvq import ops
from fusedvq.cpu import partials as cpu_partials
from fusedvq.cpu import small as cpu_small
from oracle import TOLERANCE, oracle_z, partials_hybrid_oracle, partials_oracle, project_category_metric, strided

PARTIAL_FORMS = ("partials", "partials_module")


def draw_partials(seed: int) -> Case:
    """A random partials Case that can exist."""
    rng = random.Random(seed)
    pick = rng.choice
    form, backend = pick(PARTIAL_FORMS), "triton" if rng.random() < 0.2 else "reference"
    compiled = pick(("aot_eager",) * 4 + ("inductor",)) if backend == "reference" and rng.random() < 0.03 else ""
    norm, P = pick(("none", "stats", "batch")), pick((1, 2, 3, 6, 24))
    autocast = backend == "reference" and rng.random() < 0.2
    dtype = pick(("float32", "bfloat16") if autocast else ("float32", "float16", "bfloat16") +
                 (("float64",) if backend == "reference" else ()))
    target_dtype = pick(("float32", "bfloat16")) if autocast and rng.random() < 0.5 else ""
    width = rng.randint(1, 4) if rng.random() < 0.5 else 0  # the gap's c
    limit_rows = block_rows = 0
    if backend == "triton":
        B, (D, K) = pick((1, 2, 3, 5, 17)), pick(((12, 7), (40, 30), (23, 23)))
    elif rng.random() < 0.2:  # the real limit (all P partials in one block), at K = 171: B on either side
        D, K = 187, 171
        B = max(1, (1 << 18) // (P * (K + width)) + pick((0, 1)))
    else:
        D, K = pick(((12, 7), (40, 30), (23, 23), (60, 9)))
        limit_rows, block_rows = rng.randint(2, 6), rng.randint(1, 3)
        B = pick((1, 2, 3, limit_rows, limit_rows + 1, 3 * limit_rows + 1))
    selector = pick(("mask", "index", "duplicates"))
    if selector == "mask" and D == K:
        K = D - 1
    gap = (rng.randint(0, K), width) if width else (0, 0)
    return Case(
        seed=seed, form=form, backend=backend, compiled=compiled, norm=norm, reduction=pick(("mean", "column")),
        gap=gap, nan_to_num=rng.random() < 0.35, dtype=dtype, target_dtype=target_dtype, autocast=autocast,
        layout=(pick(("contiguous", "slice", "transposed")), pick(("contiguous", "slice", "transposed"))),
        grads=(rng.random() < 0.7, rng.random() < 0.7, rng.random() < 0.7),
        grad_mode=pick(("grad",) * 8 + ("no_grad", "inference")), shape=(max(B, 2) if norm == "batch" else B, D, K),
        selector=selector, stats_space=pick(("raw", "masked")), limit_rows=limit_rows, block_rows=block_rows,
        embed=bool(width) and rng.random() < 0.6, partials=P, listed=rng.random() < 0.5)


def _stacked(t: torch.Tensor, how: str) -> torch.Tensor:
    """[P, B, W] in another layout: contiguous, a view into a wider tensor, or column-major."""
    if how == "slice":
        wide = torch.randn(*t.shape[:2], t.shape[2] + 5, dtype=t.dtype)
        wide[:, :, 2 : 2 + t.shape[2]] = t
        return wide[:, :, 2 : 2 + t.shape[2]]
    return t.permute(2, 0, 1).contiguous().permute(1, 2, 0) if how == "transposed" else t.contiguous()


def make_partials(case: Case) -> Data:
    """Data of a partials case: r the partials ([P, B, W] or a list of P [B, W]), e the embeddings [B, c]."""
    g, index, idx, mean, std, x = inputs(case)
    B, D, K = case.shape
    cats = _categories(g, K, False) if case.form == "partials_module" and case.partials % min(3, K) == 0 else {}
    rd = DTYPES[case.target_dtype or case.dtype]
    r = torch.randn(case.partials, B, K + case.gap[1], generator=g, dtype=torch.float64).to(rd)
    r = [strided(p, case.layout[1]) for p in r] if case.listed else _stacked(r, case.layout[1])
    e = torch.randn(B, case.gap[1], generator=g, dtype=torch.float64).to(rd) if case.embed else None
    return Data(index, idx, mean, std, cats, None, None, strided(x.to(DTYPES[case.dtype]), case.layout[0]), r,
                None if e is None else strided(e, case.layout[1]))


def decoder_categories(categories: dict, gap: tuple) -> dict:
    """The categories in a hybrid decoder's K + c columns: kept column k at k + c·[k ≥ at], the c embedding
    columns in the first category (as a trainer's INITIAL category holds them)."""
    at, c = gap
    out = {name: [k + c if k >= at else k for k in cols] for name, cols in categories.items()}
    first = next(iter(out))
    out[first] = out[first] + list(range(at, at + c))
    return out


def build_partials(case: Case, d: Data):
    """(call(x, partials, embeddings) -> the result, the module holding the categories' layout or None)."""
    B, D, K = case.shape
    stats = {}
    if case.norm == "stats":
        stats = dict(mean=d.mean, std=d.std, **({"stats_space": "raw"} if D == K else {})) \
            if case.stats_space == "raw" else dict(mean=d.mean[d.idx], std=d.std[d.idx], stats_space="masked")
    opts = dict(norm=case.norm, nan_to_num=case.nan_to_num, backend=case.backend, reduction=case.reduction,
                target_gap=case.gap, **stats)
    if case.form == "partials":
        return lambda x, r, e: fusedvq.partials_mse(x, r, d.index, embeddings=e, **opts), None
    layout = {}
    if d.categories:
        layout = dict(categories=d.categories, levels=case.partials // len(d.categories),
                      decoder_categories=decoder_categories(d.categories, case.gap) if case.gap[1] else None)
    module = fusedvq.PartialsMSELoss(d.index, num_features=D, **opts, **layout)
    return (lambda x, r, e: module(x, r, embeddings=e)), module if layout else None


@contextlib.contextmanager
def partials_settings(case: Case):
    """The case's route limits (the stacked partials' blocks of limit_rows rows, the list's of block_rows, the
    target's small routes at limit_rows rows)."""
    with contextlib.ExitStack() as stack:
        K, W = case.shape[2], case.shape[2] + case.gap[1]
        if case.limit_rows:
            for owner, name, value in ((cpu_partials, "_BLOCK_ELEMENTS", case.limit_rows * case.partials * W),
                                       (ops, "_COMPOSED_MAX_ELEMENTS", case.limit_rows * K),
                                       (ops, "_GAP_COMPOSED_MAX_ELEMENTS", case.limit_rows * K),
                                       (cpu_small, "SMALL_ELEMENTS", case.limit_rows * K)):
                stack.enter_context(mock.patch.object(owner, name, value))
        if case.block_rows:
            stack.enter_context(mock.patch.object(cpu_partials, "_LIST_BLOCK_ELEMENTS", case.block_rows * K))
        yield


def _reference(case: Case, d: Data, grad_out, through_stats=True):
    """(result, grad_x, grad_partials, grad_embeddings or None) of the float64 oracle."""
    stats = (d.mean, d.std) if case.norm == "stats" else (None, None)
    clean = dict(nan_to_num=case.nan_to_num, through_stats=through_stats)
    if case.embed:
        return partials_hybrid_oracle(d.x, d.r, d.e, d.idx, stats, grad_out, at=case.gap[0], norm=case.norm,
                                      reduction=case.reduction, **clean)
    return (*partials_oracle(d.x, d.r, d.idx, *stats, case.norm, grad_out, reduction=case.reduction, gap=case.gap,
                             **clean), None)


def _metric(case: Case, d: Data) -> torch.Tensor:
    """The project's level-averaged metric on the target the case compares: combine(z, embeddings) in decoder
    columns, else z on the kept columns (the partials' gap columns dropped)."""
    stats = (d.mean, d.std) if case.norm == "stats" else (None, None)
    z = oracle_z(d.x.detach().double(), d.idx, *stats, case.norm, nan_to_num=case.nan_to_num)
    r, (at, c) = torch.stack(list(d.r)).detach().double(), case.gap
    levels = case.partials // len(d.categories)
    if case.embed:
        combined = torch.cat([z[:, :at], d.e.detach().double(), z[:, at:]], 1)
        return project_category_metric(r, combined, decoder_categories(d.categories, case.gap), levels)
    kept = [k for k in range(r.shape[2]) if not at <= k < at + c]
    return project_category_metric(r[:, :, kept], z, d.categories, levels)


def _leaves(t, want: bool):
    return [p.detach().clone().requires_grad_(want) for p in t] if isinstance(t, list) else \
        t.detach().clone().requires_grad_(want)


def _grad(t):
    """The partials' gradient as one [P, B, W] tensor (a list's stacked), or None."""
    if not isinstance(t, list):
        return t.grad
    return None if any(p.grad is None for p in t) else torch.stack([p.grad for p in t])


def run_partials(case: Case, fresh_compiler: bool = True) -> None:
    """Run one partials case against the oracle; AssertionError naming every difference."""
    d = make_partials(case)
    x, r = _leaves(d.x, case.grads[0]), _leaves(d.r, case.grads[1])
    e = None if d.e is None else _leaves(d.e, case.grads[2])
    before = [t.detach().clone() for t in (d.x, torch.stack(list(d.r)))]
    call, owner = build_partials(case, d)
    if case.compiled and fresh_compiler:
        torch._dynamo.reset()
    fn = torch.compile(call, backend=case.compiled, fullgraph=True) if case.compiled else call
    with partials_settings(case):
        with modes(case):
            out = fn(x, r, e)
            cat = None
            if owner is not None and case.reduction == "column":
                cat = owner.category_errors(out) if e is not None else owner.feature_category_errors(out)
        grad_out = backward(case, out)
    ref, ref_gx, ref_gr, ref_ge = _reference(case, d, grad_out)
    floor = _reference(case, d, grad_out, False)[1].norm().item() if case.norm == "batch" else 0.0
    problems = []
    want = (torch.float64 if x.dtype == torch.float64 else torch.float32) if case.autocast else x.dtype
    if out.dtype != want:
        problems.append(f"result dtype {out.dtype}, expected {want}")
    close("result", out, ref, TOLERANCE[out.dtype], problems)
    if cat is not None:
        close("category errors", cat, _metric(case, d), TOLERANCE[out.dtype], problems)
    wants_grad = case.grad_mode == "grad" and any(case.grads[: 3 if e is not None else 2])
    if out.requires_grad != wants_grad:
        problems.append(f"result requires_grad={out.requires_grad}, expected {wants_grad}")
    rows = [("grad_x", x.grad, x.dtype, ref_gx, case.grads[0], floor),
            ("grad_partials", _grad(r), d.r[0].dtype, ref_gr, case.grads[1], 0.0)]
    rows += [("grad_embeddings", e.grad, e.dtype, ref_ge, case.grads[2], 0.0)] if e is not None else []
    check_grads(rows, wants_grad, problems)
    for name, old, new in zip(("features", "partials"), before, (x, torch.stack(list(r)))):
        if not torch.equal(old.nan_to_num(7.0), new.detach().nan_to_num(7.0)):
            problems.append(f"the call wrote into its {name}")
    assert not problems, "; ".join(problems)
