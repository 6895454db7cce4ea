"""norm="batch" at small B on the CPU (cpu/small.py: the one-block path with batch norm's VJP written out)
against the float64 oracle, beside the blocked passes it replaces there: the loss and clean_features, every
reduction, NaN/Inf with nan_to_num, a column constant within the batch, a large offset, duplicate indices,
float64 to 1e-12, grad_output ≠ 1, B = 2 (the smallest batch with an unbiased std)."""

import pytest
import torch

import fusedvq
from fusedvq import reference
from fusedvq.cpu import small as cpu_small
from oracle import TOLERANCE, batch_oracle, rel_err

D, K = 13, 9
PATHS = ["small", "blocked"]


def _case(B, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, D, (K,), generator=g)
    index[1] = index[0]  # a duplicate: its gradients add up
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x[:, index[2]] = 3.25  # constant within the batch: σ → 1, z = 0
    x[:, index[3]] = 100 + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)  # |μ| ≫ σ (within what the
    # float64 oracle, which takes no shift, resolves to 1e-12)
    if B > 2:
        x[1, index[4]] = float("nan")
        x[2 % B, index[5]] = float("inf")
    r = torch.randn(B, K, generator=g, dtype=torch.float64)
    return x.to(dtype), r.to(dtype), index


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B", [2, 4, 37])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_matches_the_oracle(monkeypatch, path, B, reduction, dtype):
    if path == "blocked":
        monkeypatch.setattr(cpu_small, "SMALL_ELEMENTS", 0)
    x, r, index = _case(B, dtype, seed=B)
    x.requires_grad_()
    r.requires_grad_()
    loss_fn = fusedvq.MaskedMSELoss(index, num_features=D, norm="batch", nan_to_num=True, reduction=reduction,
                                    backend="reference")
    loss = loss_fn(x, r)
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(dtype))
    want, want_gx, want_gr = batch_oracle(x, r, index, grad_out, nan_to_num=True, reduction=reduction)
    errors = [rel_err(loss, want), rel_err(x.grad, want_gx), rel_err(r.grad, want_gr)]
    assert max(errors) <= TOLERANCE[dtype], errors


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clean_features_match_the_oracle(monkeypatch, path, dtype):
    if path == "blocked":
        monkeypatch.setattr(cpu_small, "SMALL_ELEMENTS", 0)
    x, r, index = _case(6, dtype, seed=3)
    x.requires_grad_()
    z = fusedvq.FeatureCleaner(index, num_features=D, norm="batch", nan_to_num=True, backend="reference")(x)
    loss = torch.nn.functional.mse_loss(z, r, reduction="none")  # the VQ-led step's loss, against r
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out.to(dtype))
    want, want_gx, _ = batch_oracle(x, r, index, grad_out, nan_to_num=True, reduction="none")
    assert max(rel_err(loss, want), rel_err(x.grad, want_gx)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("form", ["functional", "module", "cleaner"])
def test_the_small_path_is_what_runs_at_small_batches(monkeypatch, form):
    calls = []
    for name in ("loss", "clean"):
        real = getattr(cpu_small, name)
        monkeypatch.setattr(cpu_small, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    x, r, index = _case(4, torch.float32, seed=5)
    options = dict(num_features=D, norm="batch", backend="reference")
    if form == "functional":
        fusedvq.masked_mse(x, r, index, norm="batch", backend="reference")
    elif form == "module":
        fusedvq.MaskedMSELoss(index, **options)(x, r)
    else:
        fusedvq.FeatureCleaner(index, **options)(x)
    assert calls == [1]


@pytest.mark.parametrize("form", ["loss", "cleaner"])
def test_double_backward_matches_the_composition(form):
    """create_graph=True through the small path: the gradient's own gradient is the composition's."""
    x, r, index = _case(5, torch.float64, seed=7)
    options = dict(num_features=D, norm="batch", nan_to_num=True, backend="reference")

    def second_order(fn):
        xg = x.clone().requires_grad_()
        out = fn(xg)
        (gx,) = torch.autograd.grad(out, xg, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * torch.linspace(-1, 1, D, dtype=x.dtype)).sum(), xg)
        return gx, ggx

    if form == "loss":
        small = fusedvq.MaskedMSELoss(index, **options)
        got = second_order(lambda xg: small(xg, r))
        want = second_order(lambda xg: reference.batch_mse_composed(xg, r, index, 1e-8, True, 1))
    else:
        small = fusedvq.FeatureCleaner(index, **options)
        got = second_order(lambda xg: (small(xg) - r).square().sum())
        want = second_order(lambda xg: (reference.batch_clean_composed(xg, index, 1e-8, True) - r).square().sum())
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-12


def test_saved_tensors_go_through_hooks_and_the_output_may_be_written():
    """What the small path keeps for the backward goes through save_for_backward (offloading hooks see it),
    and the cleaner's z is the caller's to write in place: the backward does not read it."""
    x, r, index = _case(4, torch.float32, seed=11)
    x.requires_grad_()
    cleaner = fusedvq.FeatureCleaner(index, num_features=D, norm="batch", nan_to_num=True, backend="reference")
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t.clone(), lambda t: t):
        z = cleaner(x)
    assert (4, K) in packed
    want_z = z.detach().clone()
    z.mul_(1.0)  # in place on the output
    torch.nn.functional.mse_loss(z, r, reduction="none").backward(torch.ones(4, K))
    _, want_gx, _ = batch_oracle(x, r, index, torch.ones(4, K, dtype=torch.float64), nan_to_num=True,
                                 reduction="none")
    assert rel_err(z, want_z) == 0 and rel_err(x.grad, want_gx) <= TOLERANCE[torch.float32]


def test_reference_is_the_plain_statement_of_the_math():
    # reference.py states the math: no private aten ops, no in-place writes (through detached aliases or
    # otherwise), no tensor cache at module level; the small-batch route's faster forms live in cpu/small.py.
    import ast
    import inspect

    from fusedvq import reference

    tree = ast.parse(inspect.getsource(reference))
    private = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_C")]
    in_place = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                and n.func.attr.endswith("_") and not n.func.attr.startswith("_")]
    caches = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
              and isinstance(n.value, (ast.Dict, ast.Call)) and "dict" in ast.unparse(n)]
    assert not private and not in_place and not caches, (private, in_place, caches)
