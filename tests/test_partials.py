"""P partial reconstructions against one target (partials_mse / PartialsMSELoss): values, [P, K] errors and
both gradients against the float64 oracle, the per-category metric against the motivating project's loop,
list and stacked inputs, strides, the Triton kernels through the interpreter, the registered ops."""

import pytest
import torch

import fusedvq
import fusedvq.cpu.partials as cpu_partials
from fusedvq.partials import partial_category_errors
from ckpt_factory import make_plain_run, write_checkpoint
from helpers import interpreting
from oracle import TOLERANCE, oracle_z, partials_oracle, project_category_metric, random_case, rel_err, strided

D, K, P = 23, 13, 5
NORMS = ["none", "stats", "batch"]
needs_interpreter = pytest.mark.skipif(not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def case(B, *, dtype=torch.float64, gap=(0, 0), seed=0, P=P, mask=True):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, mask=mask, duplicates=not mask, generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    partials = torch.randn(P, B, K + gap[1], generator=g, dtype=torch.float64).to(dtype)
    return columns, mean, std, x, partials


def check(x, partials, columns, mean, std, norm, *, reduction="mean", gap=(0, 0), backend="reference",
          form="tensor"):
    """fusedvq's loss and both gradients for a random grad_output (≠ 1) against partials_oracle. form: the
    partials as one "tensor" or as a "list" to partials_mse, or to PartialsMSELoss ("module", "module-list")."""
    as_list, module = form.endswith("list"), form.startswith("module")
    stats = (mean, std) if norm == "stats" else (None, None)
    num = {} if columns.dtype == torch.bool else {"num_features": x.shape[1]}
    xg = x.detach().clone().requires_grad_()
    leaves = [p.detach().clone().requires_grad_() for p in partials] if as_list else [partials.detach().clone()
                                                                                   .requires_grad_()]
    given = leaves if as_list else leaves[0]
    if module:
        fn = fusedvq.PartialsMSELoss(columns, *stats, norm=norm, reduction=reduction, target_gap=gap, backend=backend,
                                     **num)
        loss = fn(xg, given)
    else:
        loss = fusedvq.partials_mse(xg, given, columns, *stats, norm=norm, reduction=reduction, target_gap=gap,
                                    backend=backend)
    grad_out = (torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5) * 1.7
    loss.backward(grad_out.to(loss.device, loss.dtype))
    ref, ref_x, ref_p = partials_oracle(x, partials, columns, mean, std, norm, grad_out, reduction=reduction, gap=gap)
    got_p = torch.stack([p.grad for p in leaves]) if as_list else leaves[0].grad
    tol = TOLERANCE[x.dtype]
    assert loss.dtype == x.dtype and loss.shape == ref.shape
    errors = {"loss": rel_err(loss, ref), "grad_x": rel_err(xg.grad, ref_x), "grad_partials": rel_err(got_p, ref_p)}
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} exceed {tol}"
    return loss, xg.grad, got_p


@pytest.mark.parametrize("norm,B", [(norm, B) for norm in NORMS for B in (1, 3, 8)
                                    if not (norm == "batch" and B == 1)])  # (norm="batch" needs two rows)
@pytest.mark.parametrize("reduction", ["mean", "column"])
def test_float64_against_oracle(norm, reduction, B):
    columns, mean, std, x, partials = case(B, seed=B)
    check(x, partials, columns, mean, std, norm, reduction=reduction)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "column"])
def test_float32_blocked_gap_strided(norm, reduction, monkeypatch):
    """The CPU path's row blocks (forced small) and column runs around a gap, on non-contiguous inputs with
    duplicate indices, module form, float32 to 1e-5."""
    monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 3 * P * (K + 4))
    columns, mean, std, x, partials = case(17, dtype=torch.float32, gap=(4, 3), seed=5, mask=False)
    x = strided(x, "transposed")
    partials = partials.transpose(0, 1).contiguous().transpose(0, 1)  # [P, B, W] stored batch-major
    check(x, partials, columns, mean, std, norm, reduction=reduction, gap=(4, 3), form="module")


@pytest.mark.parametrize("reduction", ["mean", "column"])
def test_list_against_oracle_and_stacked(reduction, monkeypatch):
    """A list of partials (read in place on the CPU: row blocks forced small, a gap, non-contiguous members)
    against the oracle, and the same numbers as the stacked tensor."""
    monkeypatch.setattr(cpu_partials, "_LIST_BLOCK_ELEMENTS", 3 * K)
    monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 4 * P * (K + 2))  # in place above 4 rows
    columns, mean, std, x, partials = case(8, dtype=torch.float32, gap=(6, 2), seed=2)
    listed = [strided(p, "transposed") for p in partials]
    got = check(x, listed, columns, mean, std, "stats", form="list", reduction=reduction, gap=(6, 2))
    stacked = check(x, partials, columns, mean, std, "stats", reduction=reduction, gap=(6, 2))
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(got, stacked))


@pytest.mark.parametrize("in_place", [True, False])
def test_list_float64_double_backward(in_place, monkeypatch):
    if in_place:
        monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 1)
    columns, mean, std, x, partials = case(3, seed=13, P=2)
    check(x, list(partials), columns, mean, std, "none", form="list")
    r = [p.clone().requires_grad_() for p in partials]
    f = lambda a, *b: fusedvq.partials_mse(a, list(b), columns, norm="none", reduction="column")  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(), *r))


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_nan_to_num(norm):
    """Non-finite features become 0 before the normalization (zero gradient there), as for the loss."""
    columns, mean, std, x, partials = case(5, seed=15)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    stats = (mean, std) if norm == "stats" else (None, None)
    xg, r = x.clone().requires_grad_(), partials.clone().requires_grad_()
    loss = fusedvq.partials_mse(xg, r, columns, *stats, norm=norm, reduction="column", nan_to_num=True)
    grad_out = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    loss.backward(grad_out)
    ref, ref_x, ref_p = partials_oracle(x, partials, columns, *stats, norm, grad_out, reduction="column",
                                        nan_to_num=True)
    assert max(rel_err(loss, ref), rel_err(xg.grad, ref_x), rel_err(r.grad, ref_p)) <= 1e-12


def test_autocast_float32_result():
    columns, mean, std, x, partials = case(4, dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedvq.partials_mse(x.bfloat16(), partials, columns, mean, std)
    ref = partials_oracle(x.bfloat16(), partials, columns, mean, std, "stats", torch.tensor(1.0))[0]
    assert loss.dtype == torch.float32 and rel_err(loss, ref) <= 1e-5


# ---------------------------------------------------------------------------------- the category metric


def test_category_metric_matches_project_loop():
    """category_errors of the [P, K] errors equals the project's loop over categories and levels (decoder
    space = the compared columns here), float64 to 1e-12, float32 to 1e-5; the mean of the errors is the
    informativeness loss. (Module statistics are float32: norm="batch" keeps the float64 case exact.)"""
    levels, categories = 3, {"initial": [0, 1, 2], "summary": [3, 5, 7, 9, 11], "temporal": [4, 6, 8, 10, 12, 2]}
    for dtype in (torch.float64, torch.float32):
        columns, mean, std, x, partials = case(7, dtype=dtype, P=len(categories) * levels, seed=4)
        # (norm="batch": a module holds given statistics in float32, which a float64 oracle would see)
        fn = fusedvq.PartialsMSELoss(columns, norm="batch", reduction="column", categories=categories, levels=levels)
        errors = fn(x, partials)
        target = oracle_z(x.double(), columns, None, None, "batch")
        want = project_category_metric(partials.double(), target, categories, levels)
        assert rel_err(fn.category_errors(errors), want) <= TOLERANCE[dtype]
        info = sum(torch.nn.functional.mse_loss(p, target) for p in partials.double()) / len(partials)
        assert rel_err(errors.mean(), info) <= TOLERANCE[dtype]


def test_from_checkpoint_metric(tmp_path):
    """A VQ-VAE checkpoint's mask, statistics and categories (8 × 3 = 24 partials): the metric in the
    checkpoint's category order against the project's loop, to float32 rounding."""
    parts = make_plain_run(seed=5)
    fn = fusedvq.PartialsMSELoss.from_checkpoint(write_checkpoint(tmp_path, parts), num_features=parts.D,
                                                 reduction="column", levels=3)
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, parts.D, generator=g)
    partials = [torch.randn(6, parts.K, generator=g) for _ in range(24)]
    metric = fn.category_errors(fn(x, partials))
    mask = torch.from_numpy(parts.mask)
    target = (x.double()[:, mask] - torch.from_numpy(parts.mean_k)) / torch.from_numpy(parts.std_k)
    want = project_category_metric([p.double() for p in partials], target, parts.groups, 3)
    assert fn.category_names == tuple(parts.groups) and rel_err(metric, want) <= 1e-5


def test_category_metric_by_partial_map():
    """partial_categories (each partial's category, any order) gives the N×L result of the same partials
    reordered; a NaN in one category's errors stays there."""
    categories = {"a": [0, 4], "b": [1, 2, 3], "c": [5, 6, 6]}
    errors = torch.rand(6, 7, dtype=torch.float64)
    owner = ["c", "a", "b", 0, 2, "b"]
    order = [1, 3, 2, 5, 0, 4]  # partials of a, then b, then c
    want = partial_category_errors(errors[order], categories, levels=2)
    got = partial_category_errors(errors, categories, partial_categories=owner)
    assert rel_err(got, want) <= 1e-12
    errors[1, 3] = float("nan")  # partial 1 is "a"'s, column 3 is "b"'s: no category reads it
    errors[0, 5] = float("nan")  # "c"'s
    got = partial_category_errors(errors, categories, partial_categories=owner)
    assert torch.isnan(got[2]) and torch.isfinite(got[:2]).all()


# ------------------------------------------------------------------------------- Triton (interpreter)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "column"])
def test_triton_interpreter_parity(reduction):
    """The kernel pair against the oracle on strided inputs with a gap, and bitwise the same twice."""
    columns, mean, std, x, partials = case(11, dtype=torch.float32, gap=(5, 2), seed=6)
    partials = partials.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # column-major storage
    got = check(x, partials, columns, mean, std, "stats", reduction=reduction, gap=(5, 2), backend="triton")
    again = check(x, partials, columns, mean, std, "stats", reduction=reduction, gap=(5, 2), backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@needs_interpreter
def test_triton_one_gradient():
    """Only the partials' gradient (features constant), and only the target's."""
    columns, mean, std, x, partials = case(5, dtype=torch.float32, seed=7)
    r = partials.clone().requires_grad_()
    fusedvq.partials_mse(x, r, columns, mean, std, backend="triton").backward()
    _, _, ref_p = partials_oracle(x, partials, columns, mean, std, "stats", torch.tensor(1.0))
    assert rel_err(r.grad, ref_p) <= 1e-5
    xg = x.clone().requires_grad_()
    fusedvq.partials_mse(xg, partials, columns, mean, std, backend="triton").backward()
    assert rel_err(xg.grad, partials_oracle(x, partials, columns, mean, std, "stats", torch.tensor(1.0))[1]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("B", [4, 257, 4099])
def test_cuda(backend, reduction, B):
    """On CUDA: the kernels (and the PyTorch path there) against the oracle, stacked and as a list, with a
    gap and batch-major partials; the kernels bitwise repeatable."""
    columns, mean, std, x, partials = case(B, dtype=torch.float32, gap=(5, 2), seed=14, P=24)
    cuda = [t.cuda() for t in (columns, mean, std, x, partials.transpose(0, 1).contiguous().transpose(0, 1))]
    columns, mean, std, x, partials = cuda
    got = check(x, partials, columns, mean, std, "stats", reduction=reduction, gap=(5, 2), backend=backend)
    check(x, list(partials), columns, mean, std, "batch", reduction=reduction, gap=(5, 2), backend=backend,
          form="list")
    again = check(x, partials, columns, mean, std, "stats", reduction=reduction, gap=(5, 2), backend=backend)
    if backend == "triton":
        assert all(torch.equal(a, b) for a, b in zip(got, again))


# ------------------------------------------------------------------------------- ops, autograd, errors


def _op_args(use_triton, reduction):
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 5, generator=g, requires_grad=True)
    r = torch.randn(3, 6, 7, generator=g, requires_grad=True)
    return (z, r, None), {"reduction": reduction, "gap_at": 2, "gap_width": 2, "use_triton": use_triton}


@pytest.mark.parametrize("use_triton, reduction", [(False, 1), pytest.param(True, 3, marks=needs_interpreter)])
def test_opcheck(use_triton, reduction):
    args, kwargs = _op_args(use_triton, reduction)
    torch.library.opcheck(torch.ops.fusedvq.partials_mse_forward.default, args, kwargs)
    loss = torch.ops.fusedvq.partials_mse_forward(*args, **kwargs)
    bwd = (torch.rand_like(loss) + 0.5, *(t.detach() for t in args[:2]), None)
    torch.library.opcheck(torch.ops.fusedvq.partials_mse_backward.default, bwd,
                          {**kwargs, "needs": [True, True]})


def test_compile_fullgraph():
    torch._dynamo.reset()
    columns, mean, std, x, partials = case(6, dtype=torch.float32, seed=10)
    fn = fusedvq.PartialsMSELoss(columns, norm="batch", reduction="column")
    xg, r = x.clone().requires_grad_(), partials.clone().requires_grad_()
    # aot_eager: the same tracing (fake implementations, registered autograd, no graph break) as inductor,
    # without its code generation (tens of seconds on 2 cores)
    loss = torch.compile(lambda a, b: fn(a, b).mean(), fullgraph=True, backend="aot_eager")(xg, r)
    loss.backward()
    ref, ref_x, ref_p = partials_oracle(x, partials, columns, None, None, "batch", torch.tensor(1.0))
    assert rel_err(loss, ref.mean()) <= 1e-5
    assert rel_err(xg.grad, ref_x) <= 1e-5 and rel_err(r.grad, ref_p) <= 1e-5


def test_double_backward_gradcheck():
    """Through the composition (create_graph=True), norm="batch" (the gradient through μ, σ), with a gap."""
    columns, _, _, x, _ = case(3, seed=11)
    r = torch.randn(2, 3, K + 1, dtype=torch.float64, requires_grad=True)
    def f(a, b):
        return fusedvq.partials_mse(a, b, columns, norm="batch", reduction="column", target_gap=(3, 1))
    assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(), r))


def test_errors():
    columns, mean, std, x, partials = case(4, dtype=torch.float32, seed=12)
    call = fusedvq.partials_mse
    with pytest.raises(ValueError, match=f"partials have {K + 1} columns but must have {K}"):
        call(x, torch.randn(P, 4, K + 1), columns, mean, std)
    with pytest.raises(ValueError, match=f"must have {K + 2}: the {K} kept columns and the 2 columns"):
        call(x, partials, columns, mean, std, target_gap=(3, 2))
    with pytest.raises(ValueError, match="features have 4 rows but the partials have 3"):
        call(x, partials[:, :3], columns, mean, std)
    with pytest.raises(ValueError, match=r"partials\[1\] is torch.float32 \(4, 12\)"):
        call(x, [partials[0], partials[1, :, :12]], columns, mean, std)
    with pytest.raises(ValueError, match="empty list"):
        call(x, [], columns, mean, std)
    with pytest.raises(TypeError, match="share one dtype"):
        call(x, partials.double(), columns, mean, std)
    with pytest.raises(ValueError, match="unknown reduction='none'"):
        call(x, partials, columns, mean, std, reduction="none")
    with pytest.raises(ValueError, match="embeddings were given, but this loss has no embedding columns"):
        call(x, partials, columns, mean, std, embeddings=torch.randn(4, 2))
    with pytest.raises(ValueError, match="needs at least 2 rows"):
        call(x[:1], partials[:, :1], columns, norm="batch")
    with pytest.raises(ValueError, match="need the VQ-VAE's categories"):
        fusedvq.PartialsMSELoss(columns, mean, std, levels=2)
    cats = {"a": [0], "b": [1, 2]}
    with pytest.raises(ValueError, match="category 'b' has no partial"):
        partial_category_errors(torch.rand(2, K), cats, partial_categories=["a", 0])
    with pytest.raises(ValueError, match=r"category_errors takes the \[4, 13\] errors"):
        partial_category_errors(torch.rand(4, K), cats, levels=2)[0:0] if False else \
            fusedvq.PartialsMSELoss(columns, mean, std, categories=cats, levels=2).category_errors(torch.rand(3, K))
    with pytest.raises(TypeError, match="levels must be an int"):
        partial_category_errors(torch.rand(4, K), cats, levels="2")

