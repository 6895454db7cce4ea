"""The CPU routes of P partials against one target that a small or a large batch takes (cpu/partials_small.py,
cpu/partials.py's reused gradient buffer): each against the float64 oracle, made to be the one taken, and
the calls each must refuse."""

import pytest
import torch

import fusedvq
import fusedvq.cpu.partials as cpu_partials
from oracle import partials_oracle, rel_err
from test_partials import NORMS, D, K, P, case, check


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("form", ["module", "module-list", "tensor", "list"])
def test_small_route(norm, reduction, form, monkeypatch):
    """A small CPU batch (cpu/partials_small.py), module and functional, against the oracle: float64 to
    1e-12 (norm "stats" in float32, a module's statistics' dtype), stacked and as a list, with the full path
    made to fail so that the route must take the call; double backward through it; a call it does not take
    (a partial of another width) still gets the full path's error."""
    import fusedvq.partials as partials_module

    def full_path(*args):
        raise AssertionError("the small-batch route did not take the call")

    monkeypatch.setattr(partials_module, "_call", full_path)
    dtype = torch.float32 if norm == "stats" else torch.float64
    columns, mean, std, x, partials = case(6, dtype=dtype, seed=17, mask=False)  # (duplicate columns)
    given = list(partials) if form == "module-list" else partials
    check(x, given, columns, mean, std, norm, reduction=reduction, form=form)
    if dtype == torch.float64 and form.startswith("module"):
        fn = fusedvq.PartialsMSELoss(columns, norm=norm, reduction=reduction, num_features=D)
        xg, r = x[:3].clone().requires_grad_(), partials[:2, :3].clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b if form == "module" else list(b)), (xg, r))
    monkeypatch.undo()
    fn = fusedvq.PartialsMSELoss(columns, *((mean, std) if norm == "stats" else ()), norm=norm, num_features=D)
    with pytest.raises(ValueError, match=r"partials\[1\] is"):
        fn(x, [partials[0], partials[1, :, :-1]])


def test_spare_gradient_buffer(monkeypatch):
    """The blocked CPU backward's reused [P, B, W] gradient buffer: a gradient still held is never written by
    the next step (a fresh buffer then), one dropped is reused, and both steps match the oracle."""
    monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 4 * P * K)  # blocked above 4 rows
    cpu_partials.release_spare()
    columns, mean, std, x, partials = case(9, dtype=torch.float32, seed=18)
    r = partials.clone().requires_grad_()
    grads, ptrs = [], []
    for step in range(3):
        r.grad = None
        scaled = 1.0 + step  # a different gradient each step
        (fusedvq.partials_mse(x, r, columns, mean, std) * scaled).backward()
        want = partials_oracle(x, partials, columns, mean, std, "stats", torch.tensor(scaled))[2]
        assert rel_err(r.grad, want) <= 1e-5
        ptrs.append(r.grad.data_ptr())
        if step == 0:
            grads.append((r.grad, r.grad.clone()))  # held: step 1 must not write it
    held, copy = grads[0]
    assert torch.equal(held, copy) and ptrs[1] != ptrs[0]
    assert ptrs[2] == ptrs[1] == cpu_partials._spare[0].data_ptr()  # step 1's, dropped, reused
    cpu_partials.release_spare()


def test_module_list_route_refusals():
    """A list the small-batch route must not take gets the full path's error, never a promoted or stacked
    result: mixed dtypes, a non-tensor, a partial of another batch size, one on the meta device."""
    columns, mean, std, x, partials = case(4, dtype=torch.float32, seed=19)
    fn = fusedvq.PartialsMSELoss(columns, mean, std)
    with pytest.raises(TypeError, match="share one dtype"):
        fn(x, [partials[0].double(), partials[1].double()])
    with pytest.raises(ValueError, match=r"partials\[1\] is torch.float64"):
        fn(x, [partials[0], partials[1].double()])
    with pytest.raises(TypeError, match=r"partials\[1\] must be a torch.Tensor"):
        fn(x, [partials[0], partials[1].tolist()])
    with pytest.raises(ValueError, match=r"partials\[1\] is torch.float32 \(3, 13\)"):
        fn(x, [partials[0], partials[1, :3]])
    with pytest.raises(ValueError, match="meta device"):
        fn(x, [partials[0].to("meta"), partials[1].to("meta")])
