"""clean_features / FeatureCleaner against the float64 oracle (values and gradients), on the reference path
and the Triton kernels (interpreted on CPU); the ops, errors and loading. (The VQ-led step they exist for:
test_clean_step.py.)"""

import pytest
import torch

import fusedvq
from ckpt_factory import make_plain_run, write_checkpoint
from helpers import BACKENDS, interpreting
from oracle import TOLERANCE, oracle_z, random_case, rel_err, strided

D, K = 40, 29
NORMS = ["none", "stats", "batch"]


def check_clean(backend, device, x, columns, mean, std, norm, *, nan_to_num=False, module=False, tol=None):
    """clean_features(x) and its gradient for a random ∂L/∂z against the float64 oracle."""
    stats = (mean, std) if norm == "stats" else (None, None)
    xg = x.detach().clone().to(device).requires_grad_()  # (x.to("cpu") would be x itself)
    if module:
        num = {} if columns.dtype == torch.bool else {"num_features": x.shape[1]}
        cleaner = fusedvq.FeatureCleaner(columns, *stats, norm=norm, nan_to_num=nan_to_num, backend=backend, **num)
        z = cleaner.to(device)(xg)
    else:
        z = fusedvq.clean_features(xg, columns, *stats, norm=norm, nan_to_num=nan_to_num, backend=backend)
    g = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z.backward(g.to(z.dtype).to(device))
    x64 = x.detach().double().requires_grad_()
    ref = oracle_z(x64, columns, mean, std, norm, nan_to_num=nan_to_num)
    ref.backward(g)
    tol = tol or TOLERANCE[x.dtype]
    assert z.dtype == x.dtype and z.shape == ref.shape and xg.grad.shape == x.shape
    assert torch.isfinite(z).all() and torch.isfinite(xg.grad).all()
    errors = {"z": rel_err(z, ref), "grad_x": rel_err(xg.grad, x64.grad)}
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} exceed {tol}"
    return z, xg.grad


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("selector", ["mask", "duplicates"])
@pytest.mark.parametrize("module", [False, True], ids=["functional", "module"])
def test_matches_oracle(backend_device, norm, selector, module):
    g = torch.Generator().manual_seed(len(norm) + 7 * module)
    columns, mean, std = random_case(37, D, K, mask=selector == "mask", duplicates=selector == "duplicates",
                                     generator=g)
    x = torch.randn(37, D, generator=g) * std + mean
    check_clean(*backend_device, x, columns, mean, std, norm, module=module)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("layout", ["slice", "transposed"])
def test_nan_inf_and_noncontiguous(backend_device, norm, layout):
    g = torch.Generator().manual_seed(11)
    columns, mean, std = random_case(23, D, K, mask=False, duplicates=True, generator=g)
    x = torch.randn(23, D, generator=g) * std + mean
    x[1, columns[0]], x[5, columns[3]], x[7, columns[-2]] = float("nan"), float("inf"), -float("inf")
    x[9, :] = float("nan")
    x = strided(x, layout)
    assert not x.is_contiguous()
    _, grad = check_clean(*backend_device, x, columns, mean, std, norm, nan_to_num=True)
    assert grad[1, columns[0]] == 0 and grad[9].abs().sum() == 0  # no gradient where x was not finite


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_dropped_columns_get_zero_gradient_and_duplicates_add(backend_device):
    backend, device = backend_device
    x = torch.randn(6, 5, device=device, requires_grad=True)
    index = torch.tensor([3, 1, 3])
    z = fusedvq.clean_features(x, index, norm="none", backend=backend)
    assert torch.equal(z.detach(), x.detach()[:, index])
    z.backward(torch.ones_like(z))
    want = torch.zeros(6, 5)
    want[:, 3], want[:, 1] = 2.0, 1.0
    assert torch.equal(x.grad.cpu(), want)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("B", [3, 64, 1031])
def test_batch_constant_columns_float32(backend_device, B):
    """Constant columns (0.1, a large offset, 0) give z = 0 exactly, and the gradient σ' = 1 means (through
    μ only: dz − mean(dz)); an offset column with a small spread keeps its accuracy in float32."""
    backend, device = backend_device
    if backend == "triton" and B == 1031 and device == "cpu":
        B = 259  # the interpreter is slow; two row tiles still merge
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 8, generator=g)
    x[:, 0], x[:, 1], x[:, 2] = 0.1, 1e4, 0.0
    x[:, 3] = 1e4 + 0.01 * torch.randn(B, generator=g)
    xg = x.clone().to(device).requires_grad_()
    everything = torch.ones(8, dtype=torch.bool)
    z = fusedvq.clean_features(xg, everything, norm="batch", backend=backend)
    dz = torch.randn(z.shape, generator=g)
    z.backward(dz.to(device))
    assert torch.equal(z[:, :3].detach().cpu(), torch.zeros(B, 3))
    x64 = x.detach().double().requires_grad_()
    ref = oracle_z(x64, everything, None, None, "batch")
    ref.backward(dz.double())
    assert rel_err(xg.grad[:, :3], dz[:, :3] - dz[:, :3].mean(0)) <= 1e-6
    assert rel_err(z[:, 3], ref[:, 3]) <= 1e-5 and rel_err(xg.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bfloat16(backend_device):
    g = torch.Generator().manual_seed(5)
    columns, mean, std = random_case(33, D, K, generator=g)
    x = (torch.randn(33, D, generator=g) * std + mean).bfloat16()
    for norm in NORMS:
        check_clean(*backend_device, x, columns, mean, std, norm)


# ------------------------------------------------------------------------------- ops, errors, loading


def _op_args(norm, use_triton, nan_to_num=True):
    from fusedvq.arguments import prepare

    g = torch.Generator().manual_seed(4)
    columns, mean, std = random_case(9, 11, 7, mask=False, duplicates=True, generator=g)
    plan = prepare(columns, mean if norm == "stats" else None, std if norm == "stats" else None, {"norm": norm},
                   num_features=11)
    x = torch.randn(9, 11, generator=g, requires_grad=True)
    options = dict(nan_to_num=nan_to_num, use_triton=use_triton)
    if norm == "batch":
        return (x, list(plan.columns), 1e-8, ""), options
    return (x, list(plan.columns), [plan.shift, plan.scale] if norm == "stats" else []), options


@pytest.mark.parametrize("use_triton", [False, pytest.param(True, marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
@pytest.mark.parametrize("norm", NORMS)
def test_opcheck(use_triton, norm):
    args, options = _op_args(norm, use_triton)
    if norm == "batch":
        torch.library.opcheck(torch.ops.fusedvq.batch_clean_forward.default, args, options)
        z, stats = torch.ops.fusedvq.batch_clean_forward(*args, **options)
        x, columns, _, group = args
        bwd = (torch.randn_like(z), x.detach(), columns, stats.detach(), group)
        torch.library.opcheck(torch.ops.fusedvq.batch_clean_backward.default, bwd, options)
    else:
        torch.library.opcheck(torch.ops.fusedvq.clean_forward.default, args, options)
        z = torch.ops.fusedvq.clean_forward(*args, **options)
        bwd = (torch.randn_like(z), args[0].detach(), *args[1:])
        torch.library.opcheck(torch.ops.fusedvq.clean_backward.default, bwd, options)


@pytest.mark.parametrize("norm", NORMS)
def test_double_backward_matches_composition(norm):
    g = torch.Generator().manual_seed(6)
    columns, mean, std = random_case(7, 9, 5, generator=g)
    stats = (mean, std) if norm == "stats" else (None, None)
    x = torch.randn(7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    z = fusedvq.clean_features(x, columns, *stats, norm=norm, backend="reference")
    w = torch.randn(z.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((z.pow(3) * w).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.square().sum(), x)
    x2 = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad((oracle_z(x2, columns, mean, std, norm).pow(3) * w).sum(), x2, create_graph=True)
    (hr,) = torch.autograd.grad(gr.square().sum(), x2)
    assert rel_err(gx, gr) <= 1e-12 and rel_err(hx, hr) <= 1e-12, (rel_err(gx, gr), rel_err(hx, hr))


def test_width_and_batch_errors_name_the_numbers():
    mask = torch.zeros(270, dtype=torch.bool)
    mask[:171] = True
    cleaner = fusedvq.FeatureCleaner(mask, norm="batch")
    with pytest.raises(ValueError, match=r"features have 187 columns but the mask was built for 270 .*keeps 171"):
        cleaner(torch.randn(4, 187))
    with pytest.raises(ValueError, match=r"at least 2 rows.*batch of 1"):
        cleaner(torch.randn(1, 270))
    with pytest.raises(ValueError, match="norm=\"stats\" needs mean and std|mean and std"):
        fusedvq.clean_features(torch.randn(4, 270), mask)
    with pytest.raises(TypeError, match="features must be floating point"):
        cleaner(torch.zeros(4, 270, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"eps"):
        fusedvq.FeatureCleaner(mask, norm="batch", eps=-1.0)


def test_from_checkpoint_matches_explicit_statistics(tmp_path):
    parts = make_plain_run(seed=3)
    path = write_checkpoint(tmp_path, parts)
    cleaner = fusedvq.FeatureCleaner.from_checkpoint(path, num_features=parts.D)
    mask = torch.from_numpy(parts.mask)
    x = torch.randn(5, parts.D, dtype=torch.float64)
    want = (x[:, mask] - torch.from_numpy(parts.mean_k)) / torch.from_numpy(parts.std_k)
    assert rel_err(cleaner(x.float()), want) <= 1e-6
    batch = fusedvq.FeatureCleaner.from_checkpoint(path, norm="batch")
    assert batch.num_kept == parts.K and batch.num_features == parts.D


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("B", [37, 3000])  # the small-batch composition, and the blocked path
def test_batch_huge_values_float32(backend_device, B):
    """Values of both signs whose squared deviations sum to near float32's top (Σ(x − μ)² ≈ 4e37–7e37),
    NaN/Inf with nan_to_num: z and its gradient finite and exact. (Beyond 3.4e38 the float32 M2 overflows
    on every backend: σ = inf, z = 0.)"""
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        B = min(B, 259)  # the interpreter is slow
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 6, generator=g) * (1e18 if B < 100 else 1.5e17)
    x[3, 1], x[7, 2], x[0, 4] = float("nan"), float("inf"), float("-inf")
    everything = torch.ones(6, dtype=torch.bool)
    check_clean(backend, device, x, everything, None, None, "batch", nan_to_num=True)
