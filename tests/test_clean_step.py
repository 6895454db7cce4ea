"""The cleaner in the VQ-led step it exists for: extractor → FeatureCleaner → encoder(z) → quantize
(straight-through) → decoder → F.mse_loss(recon, z), with z used twice, eager against the float64
composition (tests/oracle.py's oracle_z) and traced whole; clean_features traced with a mask and statistics."""

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from helpers import BACKENDS, interpreting
from oracle import oracle_z, random_case, rel_err

D, K = 40, 29


class _VQ(torch.nn.Module):
    """A small VQ-VAE: MLP encoder, nearest-code quantizer with a straight-through estimator, decoder."""

    def __init__(self, k: int, latent: int = 6, codes: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(k, 16), torch.nn.Tanh(), torch.nn.Linear(16, latent))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(latent, 16), torch.nn.Tanh(), torch.nn.Linear(16, k))
        self.register_buffer("codebook", torch.randn(codes, latent))

    def forward(self, z):
        h = self.encoder(z)
        code = self.codebook[torch.cdist(h.detach(), self.codebook.to(h.dtype)).argmin(1)].to(h.dtype)
        q = h + (code - h).detach()  # straight-through
        return self.decoder(q)


def assert_grads_close(got, want, tol=1e-4):
    """Each parameter's gradient within tol of the reference, relative to the largest reference gradient:
    some are exactly 0 in exact arithmetic (norm="batch" removes a bias's effect) and float32 noise there
    has no norm of its own to be relative to."""
    scale = max(b.double().norm().item() for b in want)
    errors = [(a.double() - b.double()).norm().item() / scale for a, b in zip(got, want)]
    assert max(errors) <= tol, f"relative gradient errors {errors}"


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", ["batch", "stats"])
def test_vq_led_step_matches_float64_composition(backend_device, norm):
    """z feeds the encoder and is the loss's target: autograd adds both gradients. Loss, the features'
    gradient and every parameter's gradient (extractor and VQ-VAE) against the float64 composition."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(1)
    columns, mean, std = random_case(4 if norm == "batch" else 16, D, K, generator=g)
    stats = (mean, std) if norm == "stats" else (None, None)
    inp = torch.randn(4, 12, generator=g)
    inp[:, 0] = 0.0  # a feature column constant in the batch (σ < eps → 1 for norm="batch")

    def run(dtype, clean):
        torch.manual_seed(0)
        extractor = torch.nn.Linear(12, D).to(dtype)
        with torch.no_grad():
            extractor.weight[:, 0] = 0.0
        vq = _VQ(K).to(dtype)
        feats = extractor(inp.to(dtype))
        feats.retain_grad()
        z = clean(feats)
        loss = F.mse_loss(vq(z), z)
        loss.backward()
        params = [p.grad for p in [*extractor.parameters(), *vq.parameters()]]
        return loss, feats.grad, params

    cleaner = fusedvq.FeatureCleaner(columns, *stats, norm=norm, nan_to_num=True, backend=backend)
    if device != "cpu":
        cleaner = cleaner.to(device)
    got = run(torch.float32, lambda f: cleaner(f.to(device)).cpu())
    want = run(torch.float64, lambda f: oracle_z(f, columns, mean, std, norm, nan_to_num=True))
    assert rel_err(got[0], want[0]) <= 1e-5
    assert rel_err(got[1], want[1]) <= 1e-4
    assert_grads_close(got[2], want[2])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("norm", ["batch", "stats"])
def test_compile_fullgraph_vq_led_step(backend, norm):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    columns, mean, std = random_case(16, D, K, generator=g)
    stats = (mean, std) if norm == "stats" else (None, None)
    cleaner = fusedvq.FeatureCleaner(columns, *stats, norm=norm, nan_to_num=True, backend=backend)
    torch.manual_seed(0)
    extractor, vq = torch.nn.Linear(12, D), _VQ(K)
    inp = torch.randn(8, 12, generator=g)

    def step(inp, cleaner_fn):
        z = cleaner_fn(extractor(inp))
        return F.mse_loss(vq(z), z)

    compiled = torch.compile(lambda inp: step(inp, cleaner), fullgraph=True, backend="aot_eager")
    params = [*extractor.parameters(), *vq.parameters()]
    for trial in range(2):
        loss = compiled(inp + trial)
        got = torch.autograd.grad(loss, params)
        ref = step(inp + trial, lambda f: oracle_z(f, columns, mean, std, norm, nan_to_num=True, dtype=torch.float32))
        want = torch.autograd.grad(ref, params)
        assert rel_err(loss, ref) <= 1e-5
        assert_grads_close(got, want)


@pytest.mark.parametrize("space", ["raw", "masked"])
def test_compile_fullgraph_functional_form_with_a_mask_and_statistics(space):
    """clean_features(x, mask, mean, std) traced: the mask's K is known on the device only, so the statistics'
    space is decided without reading it (length D: raw; otherwise per kept column, checked on the device)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    mask = torch.rand(D, generator=g) < 0.7
    mean, std = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    if space == "masked":
        mean, std = mean[mask], std[mask]
    x = torch.randn(5, D, generator=g, requires_grad=True)
    compiled = torch.compile(lambda x: fusedvq.clean_features(x, mask, mean, std), fullgraph=True, backend="aot_eager")
    z = compiled(x)
    want = oracle_z(x.detach(), mask, mean if space == "raw" else _raw(mean, mask), std if space == "raw" else
                    _raw(std, mask), "stats", dtype=torch.float64)
    assert rel_err(z, want) <= 1e-5


def _raw(kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Statistics per kept column spread to the feature columns (ones elsewhere)."""
    out = torch.ones(mask.shape[0], dtype=kept.dtype)
    out[mask] = kept
    return out
