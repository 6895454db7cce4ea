"""MaskedMSELoss: the same numbers as masked_mse, buffers that move, determinism."""

import pytest
import torch

import fusedvq
from helpers import BACKENDS, INTERPRETER_ROWS, check_parity
from oracle import random_case


def _module_call(x, r, columns, mean, std, **kwargs):
    num_features = None if columns.dtype == torch.bool else x.shape[1]
    loss = fusedvq.MaskedMSELoss(columns, mean, std, num_features=num_features, **kwargs).to(x.device)
    return loss(x, r)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("stats", ["raw", "masked"])
def test_module_parity(backend_device, reduction, stats):
    backend, device = backend_device
    g = torch.Generator().manual_seed(11)
    columns, mean, std = random_case(129, 187, 171, mask=False, duplicates=True, generator=g)
    x, r = torch.randn(129, 187, generator=g), torch.randn(129, 171, generator=g)
    check_parity(backend, device, x, r, columns, mean, std, stats=stats, reduction=reduction, call=_module_call)


def test_module_buffers_and_repr():
    mask = torch.zeros(187, dtype=torch.bool)
    mask[:171] = True
    loss = fusedvq.MaskedMSELoss(mask, torch.zeros(187), torch.full((187,), 2.0))
    assert loss.num_features == 187 and loss.num_kept == 171
    assert torch.equal(loss.index, torch.arange(171))
    assert torch.allclose(loss.scale, torch.full((171,), 0.5))
    names = {n for n, _ in loss.named_buffers()}
    assert {"index", "inv_ptr", "inv_k", "shift", "scale"} <= names
    assert loss.state_dict() == {}  # rebuilt from the VQ-VAE's files, not saved with the model
    assert "kept=171 of 187" in repr(loss)
    moved = loss.to("meta")
    assert moved.index.device.type == "meta" and moved.scale.device.type == "meta"


def test_module_half_keeps_float32_statistics():
    # μ = 1234.567 with σ = 0.1 does not survive float16: .half() on an enclosing model must not round it.
    mean, std = torch.full((20,), 1234.567), torch.full((20,), 0.1)
    mask = torch.ones(20, dtype=torch.bool)
    x = mean.expand(16, 20) + 0.1 * torch.randn(16, 20)
    r = torch.randn(16, 20)
    loss = fusedvq.MaskedMSELoss(mask, mean, std, stats_space="raw")
    want = loss(x, r)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), loss).half()
    assert loss.shift.dtype == torch.float32 and loss.scale.dtype == torch.float32
    assert model[0].weight.dtype == torch.float16
    assert torch.equal(loss(x, r), want)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bitwise_deterministic(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(2)
    # The interpreter runs programs one after another, so it cannot show an order-dependent sum: several
    # programs there (INTERPRETER_ROWS), 1000 rows (enough for CUDA's programs to race) elsewhere.
    B = INTERPRETER_ROWS if backend == "triton" and device == "cpu" else 1000
    columns, mean, std = random_case(B, 187, 171, mask=False, duplicates=True, generator=g)
    x = torch.randn(B, 187, generator=g).to(device)
    r = torch.randn(B, 171, generator=g).to(device)
    loss_fn = fusedvq.MaskedMSELoss(columns, mean, std, num_features=187, backend=backend).to(device)
    results = []
    for _ in range(3):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        loss = loss_fn(xi, ri)
        loss.backward(torch.tensor(0.7, device=device))
        results.append((loss.detach(), xi.grad, ri.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_inputs_are_not_modified(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    columns, mean, std = random_case(40, 187, 171, generator=g)
    x = torch.randn(40, 187, generator=g).to(device)
    x[0, 0] = float("nan")
    r = torch.randn(40, 171, generator=g).to(device)
    x0, r0 = x.clone(), r.clone()
    xi, ri = x.requires_grad_(), r.requires_grad_()
    fusedvq.masked_mse(xi, ri, columns, mean, std, nan_to_num=True, backend=backend).backward()
    assert torch.allclose(x.detach(), x0, equal_nan=True, rtol=0, atol=0)  # NaN-aware exact equality
    assert torch.equal(r.detach(), r0)


def test_backend_triton_is_resolved_per_call_not_at_construction():
    # Built on the CPU for use on CUDA: the constructor must not judge the backend by a CPU tensor.
    mask = torch.ones(6, dtype=torch.bool)
    loss = fusedvq.MaskedMSELoss(mask, torch.zeros(6), torch.ones(6), stats_space="raw", backend="triton")
    assert loss.backend == "triton"
    with pytest.raises(ValueError, match="unknown backend='cuda'"):
        fusedvq.MaskedMSELoss(mask, torch.zeros(6), torch.ones(6), stats_space="raw", backend="cuda")


def test_buffers_are_read_per_call_so_functional_call_can_swap_them():
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(6, dtype=torch.bool)
    loss = fusedvq.MaskedMSELoss(mask, torch.zeros(6), torch.ones(6), stats_space="raw")
    x, r = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    doubled = torch.func.functional_call(loss, {"scale": torch.full((6,), 2.0)}, (x, r))
    assert torch.allclose(doubled, torch.nn.functional.mse_loss(2 * x, r))


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_a_copy_a_pickle_and_a_swap_each_use_their_own_buffers(norm):
    """The module keeps its plan between calls (checked against the buffers by identity): deepcopy, torch.save /
    load and functional_call each compute with the buffers they hold, and writing a buffer in place shows."""
    import copy
    import io

    g = torch.Generator().manual_seed(5)
    index = torch.tensor([4, 0, 2, 2])
    stats = dict(mean=torch.randn(4, generator=g), std=torch.rand(4, generator=g) + 0.5) if norm == "stats" else {}
    loss = fusedvq.MaskedMSELoss(index, num_features=6, norm=norm, backend="reference", **stats)
    x, r = torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)
    want = loss(x, r)
    buffer = io.BytesIO()
    torch.save(loss, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(loss), torch.load(buffer, weights_only=False)):
        assert torch.equal(other(x, r), want)
    swapped = torch.func.functional_call(loss, {"index": torch.tensor([1, 3, 5, 5])}, (x, r))
    moved = fusedvq.MaskedMSELoss(torch.tensor([1, 3, 5, 5]), num_features=6, norm=norm, backend="reference",
                                  **stats)
    assert torch.equal(swapped, moved(x, r)) and not torch.equal(swapped, want)
    assert torch.equal(loss(x, r), want)  # the swap is undone after the call
    if norm == "stats":
        loss.scale.mul_(2.0)
        assert torch.allclose(loss(x, r), torch.func.functional_call(moved, {"index": index, "scale": loss.scale},
                                                                     (x, r)))
        assert not torch.equal(loss(x, r), want)
