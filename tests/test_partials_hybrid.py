"""P partial reconstructions against a hybrid's objective: each partial [B, K + c] against combine(z, embeddings)
(the cleaned features with the embeddings [B, c] inserted at the gap), exactly the mean over p of
F.mse_loss(partial_p, combined), or [P, K + c] column errors in decoder order; gradients to the features, every
partial and the embeddings; every route and backend against tests/oracle.py's partials_hybrid_oracle. (The
level-averaged metric in decoder space: test_partials_hybrid_categories.py.)"""

import pytest
import torch

import fusedvq
import fusedvq.cpu.partials as cpu_partials
from helpers import interpreting
from oracle import TOLERANCE, partials_hybrid_oracle, rel_err, strided

D, K, P, C = 23, 13, 5, 4
NORMS = ["none", "stats", "batch"]
needs_interpreter = pytest.mark.skipif(not interpreting, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


def case(B, *, dtype=torch.float64, seed=0, P=P, c=C, mask=True):
    """(columns, mean [D], std [D], x [B, D], partials [P, B, K + c], embeddings [B, c]); μ and σ that a module's
    float32 statistics hold exactly (μ in float32, σ a power of two)."""
    g = torch.Generator().manual_seed(seed)
    if mask:
        columns = torch.zeros(D, dtype=torch.bool)
        columns[torch.randperm(D, generator=g)[:K]] = True
    else:
        columns = torch.randint(0, D, (K,), generator=g)
        columns[-1] = columns[0]  # a repeated column
    mean = (torch.randn(D, generator=g) * 3).double()
    std = torch.pow(2.0, torch.randint(-1, 3, (D,), generator=g).double())
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    partials = torch.randn(P, B, K + c, generator=g, dtype=torch.float64).to(dtype)
    emb = torch.randn(B, c, generator=g, dtype=torch.float64).to(dtype)
    return columns, mean, std, x, partials, emb


def check(data, norm, *, at, reduction="mean", backend="reference", form="tensor", grads=(True, True, True)):
    """fusedvq's loss and its gradients (those of `grads`: features, partials, embeddings) for a random
    grad_output against partials_hybrid_oracle. data: case()'s (columns, mean, std, x, partials, embeddings);
    form: "tensor" / "list" to partials_mse, "module" / "module-list" to PartialsMSELoss."""
    columns, mean, std, x, partials, emb = data
    as_list, module = form.endswith("list"), form.startswith("module")
    stats = (mean, std) if norm == "stats" else (None, None)
    num = {} if columns.dtype == torch.bool else {"num_features": x.shape[1]}
    xg = x.detach().clone().requires_grad_(grads[0])
    leaves = [p.detach().clone().requires_grad_(grads[1]) for p in partials] if as_list else [
        partials.detach().clone().requires_grad_(grads[1])]
    given = leaves if as_list else leaves[0]
    eg = emb.detach().clone().requires_grad_(grads[2])
    gap = (at, emb.shape[1])
    if module:
        fn = fusedvq.PartialsMSELoss(columns, *stats, norm=norm, reduction=reduction, target_gap=gap, backend=backend,
                                     **num)
        loss = fn(xg, given, embeddings=eg)
    else:
        loss = fusedvq.partials_mse(xg, given, columns, *stats, norm=norm, reduction=reduction, target_gap=gap,
                                    embeddings=eg, backend=backend)
    grad_out = (torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.5) * 1.7
    if any(grads):
        loss.backward(grad_out.to(loss.device, loss.dtype))
    want = partials_hybrid_oracle(x, partials, emb, columns, stats, grad_out, at=at, norm=norm, reduction=reduction)
    W = K + emb.shape[1]
    assert loss.dtype == x.dtype and loss.shape == ((len(partials), W) if reduction == "column" else ())
    got_p = (torch.stack([p.grad for p in leaves]) if as_list else leaves[0].grad) if grads[1] else None
    tol = TOLERANCE[x.dtype]
    errors = {"loss": rel_err(loss, want[0])}
    for name, got, ref, wanted in zip(("grad_x", "grad_partials", "grad_embeddings"), (xg.grad, got_p, eg.grad),
                                      want[1:], grads):
        if wanted:
            errors[name] = rel_err(got, ref)
        else:
            assert got is None, f"{name} was set although not wanted"
    assert all(e <= tol for e in errors.values()), f"relative errors {errors} exceed {tol}"
    return loss, xg.grad, got_p, eg.grad


@pytest.mark.parametrize("norm,B", [(norm, B) for norm in NORMS for B in (1, 3, 8) if not (norm == "batch" and B == 1)])
@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("form", ["tensor", "list", "module", "module-list"])
def test_float64_against_oracle(norm, reduction, B, form):
    """Every form, each norm, the gap at the start, inside and at the end of the K columns: to 1e-12."""
    columns, mean, std, x, partials, emb = case(B, seed=B)
    for at in (0, 5, K):
        check((columns, mean, std, x, partials, emb), norm, at=at, reduction=reduction, form=form)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("form", ["module", "module-list"])
def test_float32_blocked_strided(norm, reduction, form, monkeypatch):
    """The CPU's blocked passes (row blocks forced small; a list read in place) on non-contiguous partials,
    features and embeddings, duplicate columns, more embedding columns than feature columns: float32 to 1e-5."""
    monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 3 * P * (K + 17))
    monkeypatch.setattr(cpu_partials, "_LIST_BLOCK_ELEMENTS", 3 * K)
    columns, mean, std, x, partials, emb = case(17, dtype=torch.float32, seed=5, c=17, mask=False)
    x, emb = strided(x, "transposed"), strided(emb, "slice")
    given = partials.transpose(0, 1).contiguous().transpose(0, 1)  # [P, B, W] stored batch-major
    if form == "module-list":
        given = [strided(p, "transposed") for p in partials]
    check((columns, mean, std, x, given, emb), norm, at=6, reduction=reduction, form=form)


@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("form", ["module", "module-list", "tensor", "list"])
def test_small_route(reduction, form, monkeypatch):
    """A small CPU batch with embeddings takes cpu/partials_small.py's few aten ops (the full path made to
    fail), float64 to 1e-12, and differentiates twice; a call it does not take (embeddings of another width)
    gets the full path's error."""
    import fusedvq.partials as partials_module

    def full_path(*args):
        raise AssertionError("the small-batch route did not take the call")

    monkeypatch.setattr(partials_module, "_call", full_path)
    for norm in NORMS:  # (norm "stats" in float32: a module's statistics' dtype, which the route takes)
        dtype = torch.float32 if norm == "stats" else torch.float64
        columns, mean, std, x, partials, emb = case(6, dtype=dtype, seed=17, mask=False)
        check((columns, mean, std, x, partials, emb), norm, at=3, reduction=reduction, form=form)
    columns, mean, std, x, partials, emb = case(6, seed=17, mask=False)
    fn = fusedvq.PartialsMSELoss(columns, norm="batch", reduction=reduction, num_features=D, target_gap=(3, C))
    if form == "module":  # (the module's stacked partials: the same double backward for every form)
        xg, r, e = x[:3].clone().requires_grad_(), partials[:2, :3].clone().requires_grad_(), emb[:3].clone()
        assert torch.autograd.gradgradcheck(lambda a, b, c: fn(a, b, embeddings=c), (xg, r, e.requires_grad_()))
    monkeypatch.undo()
    with pytest.raises(ValueError, match=rf"embeddings must be \[B, {C}\].*got shape \(6, {C + 1}\)"):
        fn(x, partials, embeddings=torch.randn(6, C + 1, dtype=torch.float64))


@pytest.mark.parametrize("grads", [(False, False, True), (True, False, False), (False, True, False),
                                   (False, False, False)])
def test_one_gradient(grads):
    """Only the gradients wanted are computed (embeddings that require none get none), on the blocked path."""
    columns, mean, std, x, partials, emb = case(9, dtype=torch.float32, seed=3)
    check((columns, mean, std, x, partials, emb), "stats", at=4, form="module", grads=grads)


def test_autocast_float32_result():
    columns, mean, std, x, partials, emb = case(4, dtype=torch.float32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fusedvq.partials_mse(x.bfloat16(), partials, columns, mean, std, target_gap=(2, C), embeddings=emb)
    ref = partials_hybrid_oracle(x.bfloat16(), partials, emb, columns, (mean, std), torch.tensor(1.0), at=2,
                                 norm="stats")[0]
    assert loss.dtype == torch.float32 and rel_err(loss, ref) <= 1e-5


# ------------------------------------------------------------------------------- Triton (interpreter)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "column"])
@pytest.mark.parametrize("at", [0, 5, K])
def test_triton_interpreter_parity(reduction, at):
    """The kernel pair reads the embeddings in place (strided) beside column-major partials, against the
    oracle, bitwise the same twice; and with the embeddings' gradient alone."""
    columns, mean, std, x, partials, emb = case(11, dtype=torch.float32, seed=6, c=3)
    partials = partials.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    emb = strided(emb, "transposed")
    got = check((columns, mean, std, x, partials, emb), "stats", at=at, reduction=reduction, backend="triton")
    again = check((columns, mean, std, x, partials, emb), "stats", at=at, reduction=reduction, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    check((columns, mean, std, x, partials, emb), "batch", at=at, reduction=reduction, backend="triton",
          form="module-list", grads=(False, False, True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("B", [4, 4099])
def test_cuda(backend, B):
    """On CUDA, P = 24 and c = 28: the kernels (and the PyTorch path there) against the oracle, batch-major
    partials and strided embeddings, then a list; the kernels bitwise repeatable."""
    columns, mean, std, x, partials, emb = (t.cuda() for t in case(B, dtype=torch.float32, seed=14, P=24, c=28))
    partials, emb = partials.transpose(0, 1).contiguous().transpose(0, 1), strided(emb, "transposed")
    for reduction in ("mean", "column"):
        got = check((columns, mean, std, x, partials, emb), "stats", at=5, reduction=reduction, backend=backend)
        again = check((columns, mean, std, x, partials, emb), "stats", at=5, reduction=reduction, backend=backend)
        assert backend != "triton" or all(torch.equal(a, b) for a, b in zip(got, again))
        check((columns, mean, std, x, list(partials), emb), "batch", at=K, reduction=reduction, backend=backend,
              form="module-list")


# ------------------------------------------------------------------------------- ops, autograd, errors


@pytest.mark.parametrize("use_triton, reduction", [(False, 1), (False, 3),
                                                   pytest.param(True, 3, marks=needs_interpreter),
                                                   pytest.param(True, 1, marks=needs_interpreter)])
def test_opcheck(use_triton, reduction):
    g = torch.Generator().manual_seed(8)
    z, r = torch.randn(6, 5, generator=g, requires_grad=True), torch.randn(3, 6, 7, generator=g, requires_grad=True)
    e = torch.randn(6, 2, generator=g, requires_grad=True)
    kwargs = {"reduction": reduction, "gap_at": 2, "gap_width": 2, "use_triton": use_triton}
    torch.library.opcheck(torch.ops.fusedvq.partials_mse_forward.default, (z, r, e), kwargs)
    loss = torch.ops.fusedvq.partials_mse_forward(z, r, e, **kwargs)
    assert loss.shape == ((3, 7) if reduction == 3 else ())
    bwd = (torch.rand_like(loss) + 0.5, z.detach(), r.detach(), e.detach())
    torch.library.opcheck(torch.ops.fusedvq.partials_mse_backward.default, bwd, {**kwargs, "needs": [True] * 3})


@pytest.mark.parametrize("form", ["module", "functional"])
def test_compile_fullgraph(form):
    """Traced whole (aot_eager: dynamo's and AOTAutograd's tracing without inductor's code generation), a module
    and the functional form with a bool mask (its gather sized by the partials' width)."""
    torch._dynamo.reset()
    columns, _, _, x, partials, emb = case(6, dtype=torch.float32, seed=10)
    fn = fusedvq.PartialsMSELoss(columns, norm="batch", reduction="column", target_gap=(4, C))
    if form == "functional":
        def fn(a, b, embeddings):
            return fusedvq.partials_mse(a, b, columns, norm="batch", reduction="column", target_gap=(4, C),
                                        embeddings=embeddings)
    xg, r, e = (t.clone().requires_grad_() for t in (x, partials, emb))
    loss = torch.compile(lambda a, b, c: fn(a, b, embeddings=c).mean(), fullgraph=True, backend="aot_eager")(xg, r, e)
    loss.backward()
    want = partials_hybrid_oracle(x, partials, emb, columns, (None, None), torch.tensor(1.0), at=4, norm="batch")
    assert rel_err(loss, want[0]) <= 1e-5
    assert all(rel_err(got, ref) <= 1e-5 for got, ref in zip((xg.grad, r.grad, e.grad), want[1:]))


@pytest.mark.parametrize("listed", [False, True])
def test_double_backward_gradcheck(listed, monkeypatch):
    """Through the composition (create_graph=True), norm="batch", the blocked path and a list read in place."""
    monkeypatch.setattr(cpu_partials, "_BLOCK_ELEMENTS", 1)
    columns, _, _, x, partials, emb = case(3, seed=11, P=2, c=2)

    def f(a, e, *b):
        return fusedvq.partials_mse(a, list(b) if listed else b[0], columns, norm="batch", reduction="column",
                                    target_gap=(3, 2), embeddings=e)
    r = list(partials) if listed else [partials]
    assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(), emb.clone().requires_grad_(),
                                            *(t.clone().requires_grad_() for t in r)))


def test_errors():
    columns, mean, std, x, partials, emb = case(4, dtype=torch.float32, seed=12)
    call = fusedvq.partials_mse
    with pytest.raises(ValueError, match=r"embeddings were given, but .* no embedding columns \(target_gap=\(0, 0\)\)"):
        call(x, partials[:, :, :K], columns, mean, std, embeddings=emb)
    with pytest.raises(ValueError, match=rf"embeddings must be \[B, {C}\] .* got shape \(4, 3\)"):
        call(x, partials, columns, mean, std, target_gap=(2, C), embeddings=emb[:, :3])
    with pytest.raises(ValueError, match="embeddings have 3 rows but features have 4"):
        call(x, partials, columns, mean, std, target_gap=(2, C), embeddings=emb[:3])
    with pytest.raises(TypeError, match="embeddings are torch.float64 but the partials are torch.float32"):
        call(x, partials, columns, mean, std, target_gap=(2, C), embeddings=emb.double())
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        call(x, partials, columns, mean, std, target_gap=(2, C), embeddings=emb.tolist())
    with pytest.raises(ValueError, match="embeddings .* meta device"):
        call(x, partials, columns, mean, std, target_gap=(2, C), embeddings=emb.to("meta"))
