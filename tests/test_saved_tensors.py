"""What the eager paths keep for the backward goes through save_for_backward, so saved-tensor hooks (activation
offloading, e.g. torch.autograd.graph.save_on_cpu) see all of it, and the gradients stay exact when the
hooks hand back copies."""

import pytest
import torch

import fusedvq
from fusedvq import ops as routing
from fusedvq.cpu import small as cpu_small
from fusedvq.cpu import blocked as cpu
from helpers import BACKENDS
from oracle import batch_oracle, oracle, random_case, rel_err

B, D, K = 40, 23, 17


class _Offload:
    """Hooks that pack a copy and unpack a fresh copy of it (what offloading does), recording the shapes."""

    def __init__(self):
        self.shapes = []

    def pack(self, t):
        self.shapes.append(tuple(t.shape))
        return t.detach().clone()

    def unpack(self, t):
        return t.clone()


@pytest.fixture
def blocked(monkeypatch):
    """The blocked CPU paths (not the small-batch composition), several row blocks."""
    monkeypatch.setattr(routing, "_COMPOSED_MAX_ELEMENTS", 0)
    monkeypatch.setattr(cpu_small, "SMALL_ELEMENTS", 0)
    monkeypatch.setattr(cpu, "_BLOCK_ELEMENTS", 7 * K)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_loss_under_offloading_hooks(blocked, backend_device, norm):
    backend, device = backend_device
    g = torch.Generator().manual_seed(1)
    mask, mean, std = random_case(B, D, K, generator=g)
    x = (torch.randn(B, D, generator=g) * std + mean).to(device).requires_grad_()
    r = torch.randn(B, K, generator=g).to(device).requires_grad_()
    stats = (mean, std) if norm == "stats" else (None, None)
    hooks = _Offload()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        loss = fusedvq.masked_mse(x, r, mask, *stats, norm=norm, backend=backend)
    grad = torch.tensor(1.3, dtype=torch.float64)
    loss.backward(grad.float().to(device), retain_graph=True)
    first = (x.grad.clone(), r.grad.clone())
    x.grad = r.grad = None
    loss.backward(grad.float().to(device))  # a second backward through the same graph: the same gradients
    if norm == "stats":
        want = oracle(x, r, mask, mean, std, grad)
    else:
        want = batch_oracle(x, r, mask, grad)
    for got in (first, (x.grad, r.grad)):
        assert rel_err(got[0], want[1]) <= 1e-5 and rel_err(got[1], want[2]) <= 1e-5
    assert (B, D) in hooks.shapes and (B, K) in hooks.shapes  # x and r at least
    if backend == "reference" and norm == "stats":
        assert hooks.shapes.count((B, K)) >= 2  # r and diff (the forward's [B, K] buffer)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_clean_under_offloading_hooks(blocked, backend_device, norm):
    backend, device = backend_device
    g = torch.Generator().manual_seed(2)
    mask, mean, std = random_case(B, D, K, generator=g)
    x = (torch.randn(B, D, generator=g) * std + mean).to(device).requires_grad_()
    stats = (mean, std) if norm == "stats" else (None, None)
    hooks = _Offload()
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        z = fusedvq.clean_features(x, mask, *stats, norm=norm, backend=backend)
    dz = torch.randn(z.shape, generator=g)
    z.backward(dz.to(device))
    x64 = x.detach().double().cpu().requires_grad_()
    if norm == "stats":
        ref = (x64 - mean.double()) / std.double()
    else:
        ref = (x64 - x64.mean(0)) / x64.std(0)
    ref[:, mask].backward(dz.double())
    assert rel_err(x.grad, x64.grad) <= 1e-5
    assert (B, D) in hooks.shapes
