"""The combinatorial differential test's cases: one Case names a point of the whole option space (form, backend,
eager or compiled, norm, reduction, weight, target gap, nan_to_num, dtypes, autocast, layouts, which inputs
want gradients, grad mode, B against the route limits, buffers changed between calls); `draw(seed)` picks one
at random, `make_data` makes its inputs, `build` its call and `change` changes its buffers; the test
(tests/test_combinations.py) runs it against the float64 oracle (tests/oracle.py), through
tests/combinations_checks.py. The partials' cases (P partial reconstructions against one target) are drawn,
made and run by tests/combinations_partials.py on the same Case.

A Case is plain data: its repr, `Case(seed=..., ...)`, is the code that replays it (tests/test_combinations.py
says how)."""

from __future__ import annotations

import dataclasses
import random

import torch

import fusedvq
from fusedvq import ops
from fusedvq.checkpoint.hybrid import HybridLayout
from fusedvq.cpu import small as cpu_small
from oracle import category_weights, strided

FORMS = ("functional", "module", "recon", "cleaner", "clean_features")
LOSS_FORMS = FORMS[:4]
CATEGORY_FORMS = ("module", "recon", "cleaner")  # built with categories: named / balanced weights, category errors
CHANGES = ("weight_inplace", "weight_reassign", "stats_inplace", "stats_swap", "index_swap")
# The functional forms' arguments changed between calls (their validated plan is cached, keyed on the tensors)
ARGUMENT_CHANGES = ("weight_inplace", "stats_inplace", "stats_swap", "index_inplace")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    seed: int  # the data's seed
    form: str = "module"  # FORMS
    backend: str = "reference"  # "reference" | "triton" (through the interpreter on CPU tensors)
    compiled: str = ""  # "" (eager) | a torch.compile backend ("aot_eager", "inductor")
    norm: str = "stats"
    reduction: str = "mean"  # loss forms: "mean" | "sum" | "none" | "column"
    weight: str = "none"  # "none" | "tensor" | "named" | "balanced"
    gap: tuple = (0, 0)  # target_gap (at, c)
    nan_to_num: bool = False  # True: NaN and ±Inf injected into the features
    dtype: str = "float32"  # the features'
    target_dtype: str = ""  # "" = the features'
    autocast: bool = False  # CPU autocast to bfloat16 around the call
    layout: tuple = ("contiguous", "contiguous")  # features, target: oracle.strided's layouts
    grads: tuple = (True, True)  # features, target require grad
    grad_mode: str = "grad"  # "grad" | "no_grad" | "inference"
    shape: tuple = (37, 40, 30)  # B, D, K
    selector: str = "mask"  # "mask" | "index" | "duplicates"
    stats_space: str = "raw"  # "raw" (length D) | "masked" (length K, stats_space="masked" passed)
    limit_rows: int = 0  # 0: the real route limits; else every route limit set to this many rows of K
    block_rows: int = 0  # 0: the real CPU block size; else blocks of this many rows
    change: str = "none"  # "none" | CHANGES: after a first call, before the checked one
    repeats: bool = False  # a category lists one column twice
    loads: str = "gather"  # Triton's forward loads ("gather" | "rows")
    embed: bool = False  # with a gap: the hybrid objective, embeddings [B, c] compared on the gap's columns
    partials: int = 0  # P > 0: P partial reconstructions against one target (tests/combinations_partials.py)
    listed: bool = False  # the partials as a list of P [B, W] tensors, not one [P, B, W]

    def __repr__(self) -> str:
        fields = dataclasses.fields(self)
        return "Case(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields
                                   if f.name == "seed" or getattr(self, f.name) != f.default) + ")"


def route_limit_rows(norm: str, gapped: bool, K: int) -> int:
    """The most rows the CPU's small route / composition takes at K kept columns (above: the blocked passes)."""
    limit = cpu_small.SMALL_ELEMENTS if norm == "batch" else (
        min(ops._COMPOSED_MAX_ELEMENTS, ops._GAP_COMPOSED_MAX_ELEMENTS) if gapped else ops._COMPOSED_MAX_ELEMENTS)
    return limit // K


def draw(seed: int) -> Case:
    """A random valid Case."""
    rng = random.Random(seed)
    pick = rng.choice
    form, backend = pick(FORMS), "triton" if rng.random() < 0.2 else "reference"
    compiled = pick(("aot_eager",) * 4 + ("inductor",)) if backend == "reference" and rng.random() < 0.03 else ""
    norm, loss = pick(("none", "stats", "batch")), form in LOSS_FORMS
    reduction = pick(("mean", "sum", "none", "column")) if loss else "none"
    weight = pick(("none", "tensor", "named", "balanced") if form in CATEGORY_FORMS else
                  ("none", "tensor") if form == "functional" else ("none",))
    selector = pick(("mask", "index", "duplicates"))
    gap = (0, 0)
    if form in CATEGORY_FORMS and rng.random() < 0.4:
        gap, selector = (-1, rng.randint(1, 4)), "mask" if form == "cleaner" else selector  # (at drawn below)
    autocast = backend == "reference" and rng.random() < 0.2
    dtype = pick(("float32", "bfloat16") if autocast else ("float32", "float16", "bfloat16") +
                 (("float64",) if backend == "reference" else ()))
    target_dtype = pick(("float32", "bfloat16")) if autocast and loss and rng.random() < 0.5 else ""
    limit_rows = block_rows = 0
    if backend == "triton":
        B, (D, K) = pick((1, 2, 3, 5, 17, 33)), pick(((12, 7), (40, 30), (23, 23)))
    elif rng.random() < 0.3:  # the real limits, at K = 171: B on either side
        D, K = 187, 171
        B = route_limit_rows(norm, gap[1] > 0, K) + pick((0, 1))
    else:
        D, K = pick(((12, 7), (40, 30), (23, 23), (60, 9)))
        limit_rows, block_rows = rng.randint(2, 6), rng.randint(1, 3)
        B = pick((1, 2, 3, limit_rows, limit_rows + 1, 3 * limit_rows + 1))
    if norm == "batch":
        B = max(B, 2)
    if selector == "mask" and D == K:
        K = D - 1
    embed = False
    if gap[1]:
        gap = (rng.randint(0, K), gap[1])
        embed = form in ("module", "recon", "cleaner") and rng.random() < 0.5
        weight = "none" if embed and weight in ("named", "balanced") else weight  # ([K]: refused with embeddings)
    change = "none" if rng.random() >= 0.3 else pick(CHANGES) if form in ("module", "recon") else \
        pick(ARGUMENT_CHANGES) if form in ("functional", "clean_features") else "none"
    if change.startswith("weight") and weight == "none" or change.startswith("stats") and norm != "stats":
        change = "none"
    return Case(
        seed=seed, form=form, backend=backend, compiled=compiled, norm=norm, reduction=reduction, weight=weight,
        gap=gap, nan_to_num=rng.random() < 0.35, dtype=dtype, target_dtype=target_dtype, autocast=autocast,
        layout=(pick(("contiguous", "slice", "transposed")), pick(("contiguous", "slice", "transposed"))),
        grads=pick(((True, True), (True, False), (False, True), (False, False))) if loss else (rng.random() < .8, False),
        grad_mode=pick(("grad",) * 8 + ("no_grad", "inference")), shape=(B, D, K), selector=selector,
        stats_space=pick(("raw", "masked")), limit_rows=limit_rows, block_rows=block_rows, change=change,
        repeats=rng.random() < 0.2, loads=pick(("gather", "rows")) if backend == "triton" else "gather",
        embed=embed)


# ------------------------------------------------------------------------------------------------- the data


def _kept(g, D: int, K: int, selector: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the index argument: a bool mask or int64 indices, idx [K] int64 in the kept order)."""
    if selector == "mask":
        mask = torch.zeros(D, dtype=torch.bool)
        mask[torch.randperm(D, generator=g)[:K]] = True
        return mask, mask.nonzero().squeeze(1)
    idx = torch.randperm(D, generator=g)[:K] if selector == "index" else torch.randint(0, D, (K,), generator=g)
    if selector == "duplicates" and K > 1:
        idx[-1] = idx[0]
    return idx, idx


def _stats(g, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) [n] float64 that float32 holds exactly as μ and 1/σ (the modules keep both in float32)."""
    mean = (torch.randn(n, generator=g) * 3).double()
    return mean, (torch.rand(n, generator=g) * 2 + 0.5).double().reciprocal()


def _categories(g, K: int, repeats: bool) -> dict:
    order, C = torch.randperm(K, generator=g).tolist(), min(3, K)
    cuts = sorted(torch.randperm(K - 1, generator=g)[: C - 1].add(1).tolist())
    cats = {f"cat{n}": cols for n, cols in enumerate(order[a:b] for a, b in zip([0] + cuts, cuts + [K]))}
    if repeats:
        cats["cat0"] = cats["cat0"] + cats["cat0"][:1]
    return cats


def _weights(g, K: int) -> torch.Tensor:
    w = (torch.rand(K, generator=g) * 2 + 0.05).float()
    w[K // 2] = 0.0  # a zero weight: its column neither counts nor gets a gradient
    return w


@dataclasses.dataclass
class Data:
    index: torch.Tensor  # the index argument
    idx: torch.Tensor  # [K] int64
    mean: torch.Tensor  # [D] float64, μ raw
    std: torch.Tensor  # [D] float64, σ raw
    categories: dict
    weight: object  # the weight argument
    w: object  # [K] float64 effective weights, or None
    x: torch.Tensor
    r: torch.Tensor
    e: object = None  # [B, c] embeddings (case.embed), or None


def features(g, case: Case, idx: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """x [B, D] float64 of order σ around μ; with case.nan_to_num, NaN and ±Inf in kept and dropped columns and
    a whole row of NaN."""
    (B, D, K), x = case.shape, torch.randn(case.shape[:2], generator=g, dtype=torch.float64) * std + mean
    if case.nan_to_num:
        x[0, idx[0]], x[-1, idx[-1]], x[B // 2, idx[K // 2]] = float("nan"), float("inf"), -float("inf")
        x[B // 3, :] = float("nan")
    return x


def inputs(case: Case) -> tuple:
    """(the case's generator, the index argument, idx [K], μ [D], σ [D], x [B, D] float64): the first draws of
    every case's data."""
    g = torch.Generator().manual_seed(case.seed)
    B, D, K = case.shape
    index, idx = _kept(g, D, K, case.selector)
    mean, std = _stats(g, D)
    return g, index, idx, mean, std, features(g, case, idx, mean, std)


def make_data(case: Case) -> Data:
    g, index, idx, mean, std, x = inputs(case)
    B, D, K = case.shape
    cats = _categories(g, K, case.repeats) if case.form in CATEGORY_FORMS else {}
    named = {name: float((torch.rand(1, generator=g) * 3 + 0.25).float()) for name in list(cats)[::2]}
    weight, w = {"none": (None, None), "tensor": (_weights(g, K),) * 2, "named": (named, None),
                 "balanced": ("balanced", None)}[case.weight]
    if case.weight in ("named", "balanced"):  # (held in float32, as modules hold their weights)
        w = category_weights(case.weight, cats, K, named).float()
    xd = DTYPES[case.dtype]
    rd = DTYPES[case.target_dtype or case.dtype]
    r = torch.randn(B, K + case.gap[1], generator=g, dtype=torch.float64)
    x, r = strided(x.to(xd), case.layout[0]), strided(r.to(rd), case.layout[1])
    e = None
    if case.embed:  # the weights then run over all K + c decoder columns
        e = strided(torch.randn(B, case.gap[1], generator=g, dtype=torch.float64).to(rd), case.layout[1])
        if case.weight == "tensor":
            weight = w = _weights(g, K + case.gap[1])
    return Data(index, idx, mean, std, cats, weight, None if w is None else w.double(), x, r, e)


# ------------------------------------------------------------------------------------------------- the run


def build(case: Case, d: Data):
    """(call(x, r) -> the result, the module whose buffers a change touches or None, the categories' owner)."""
    B, D, K = case.shape
    stats = {}
    if case.norm == "stats":  # (stats_space given when the length cannot tell: D == K)
        stats = dict(mean=d.mean, std=d.std, **({"stats_space": "raw"} if D == K else {})) \
            if case.stats_space == "raw" else dict(mean=d.mean[d.idx], std=d.std[d.idx], stats_space="masked")
    opts = dict(norm=case.norm, nan_to_num=case.nan_to_num, backend=case.backend, **stats)
    if case.form == "functional":  # (opts: the arguments a change edits, read at each call)
        opts["weight"] = d.weight
        return lambda x, r: fusedvq.masked_mse(x, r, d.index, reduction=case.reduction, **opts), opts, None
    if case.form == "clean_features":
        return lambda x, r: fusedvq.clean_features(x, d.index, **opts), opts, None
    if case.form == "cleaner":
        if case.gap[1]:
            spec = fusedvq.FeatureSpec(
                path=None, feature_mask=d.index, index=d.idx, input_dim=K + case.gap[1], categories=d.categories,
                mean=d.mean[d.idx], std=d.std[d.idx], method="standard", stats_source=None,
                hybrid=HybridLayout(K, *case.gap))
            opts.pop("mean", None), opts.pop("std", None), opts.pop("stats_space", None)
            cleaner = fusedvq.FeatureCleaner.from_spec(spec, weight=d.weight, **opts)
        else:
            cleaner = fusedvq.FeatureCleaner(d.index, num_features=D, weight=d.weight, categories=d.categories, **opts)
        return lambda x, r, e=None: cleaner.recon_loss(r, cleaner(x), case.reduction, embeddings=e), None, cleaner
    cls = fusedvq.VQReconLoss if case.form == "recon" else fusedvq.MaskedMSELoss
    module = cls(d.index, num_features=D, reduction=case.reduction, weight=d.weight, categories=d.categories,
                 target_gap=case.gap, **opts)
    return module, (module.loss if case.form == "recon" else module), module  # (module(x, r, embeddings))


def change(case: Case, d: Data, m) -> None:
    """Change m's buffers (a functional form's: the arguments it is called with) as the case says, and d to
    what the oracle must now use."""
    g = torch.Generator().manual_seed(case.seed + 1)
    if isinstance(m, dict):
        return _change_arguments(case, d, m, g)
    K, D = m.num_kept, m.num_features
    if case.change.startswith("weight"):
        d.w = _weights(g, m.weight.shape[0]).double()  # ([K + c] with embeddings)
        new = d.w.to(m.weight.device, m.weight.dtype)
        m.weight.copy_(new) if case.change == "weight_inplace" else setattr(m, "weight", new)
    elif case.change.startswith("stats"):
        d.mean, d.std = _stats(g, D)
        shift, scale = d.mean[d.idx].float(), d.std[d.idx].reciprocal().float()
        for name, new in (("shift", shift), ("scale", scale)):
            getattr(m, name).copy_(new) if case.change == "stats_inplace" else setattr(m, name, new)
    elif case.change == "index_swap":
        mean_k, std_k = d.mean[d.idx], d.std[d.idx]  # the module's statistics stay per kept column
        index, d.idx = _kept(g, D, K, "index")
        d.mean, d.std = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
        d.mean[d.idx], d.std[d.idx] = mean_k, std_k
        other = fusedvq.MaskedMSELoss(index, num_features=D, norm="none")
        for name in ("index", "inv_ptr", "inv_k"):
            setattr(m, name, getattr(other, name))


def _change_arguments(case: Case, d: Data, given: dict, g) -> None:
    """A functional form's arguments changed in place (the same tensors: their version moves) or swapped."""
    B, D, K = case.shape
    masked = case.stats_space == "masked"
    if case.change == "weight_inplace":
        d.w = _weights(g, K).double()
        given["weight"].copy_(d.w)
    elif case.change.startswith("stats"):
        d.mean, d.std = _stats(g, D)
        for name, new in (("mean", d.mean), ("std", d.std)):
            new = new[d.idx] if masked else new
            given[name].copy_(new) if case.change == "stats_inplace" else given.__setitem__(name, new.clone())
    elif case.change == "index_inplace":  # a new index of the same kind and size, written into the argument
        index, idx = _kept(g, D, K, "mask" if case.selector == "mask" else "index")
        if masked:  # the statistics given stay per kept position: the oracle's raw ones follow the new index
            mean_k, std_k = d.mean[d.idx], d.std[d.idx]
            d.mean, d.std = torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)
            d.mean[idx], d.std[idx] = mean_k, std_k
        d.index.copy_(index)
        d.idx = idx
