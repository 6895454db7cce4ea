"""The registered op: gradcheck, opcheck, torch.compile(fullgraph=True) training steps."""

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from fusedvq.arguments import build_column_map
from helpers import interpreting
from oracle import random_case, rel_err


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("nan_to_num", [False, True])
def test_gradcheck_reference_float64(reduction, nan_to_num):
    g = torch.Generator().manual_seed(0)
    columns, mean, std = random_case(5, 9, 6, mask=False, duplicates=True, generator=g)
    x = torch.randn(5, 9, dtype=torch.float64, generator=g, requires_grad=True)
    r = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, r):
        return fusedvq.masked_mse(x, r, columns, mean, std, reduction=reduction, nan_to_num=nan_to_num,
                                  backend="reference")

    assert torch.autograd.gradcheck(f, (x, r))


def _op_args(use_triton, reduction, nan_to_num, norm="stats"):
    g = torch.Generator().manual_seed(1)
    columns, mean, std = random_case(7, 12, 9, mask=False, duplicates=True, generator=g)
    cmap = build_column_map(columns, 12)
    x = torch.randn(7, 12, generator=g, requires_grad=True)
    r = torch.randn(7, 9, generator=g, requires_grad=True)
    stats = [mean[columns], std[columns].reciprocal()] if norm == "stats" else []
    options = dict(nan_to_num=nan_to_num, reduction=reduction, use_triton=use_triton, gap_at=0, gap_width=0)
    return (x, r, list(cmap), stats, None, None), options


USE_TRITON = [False, pytest.param(True, marks=pytest.mark.skipif(not interpreting, reason="interpreter"))]


@pytest.mark.parametrize("use_triton", USE_TRITON)
@pytest.mark.parametrize("reduction, nan_to_num", [(0, True), (1, False), (2, True)])  # (each value, not each pair)
def test_opcheck(use_triton, reduction, nan_to_num):
    args, options = _op_args(use_triton, reduction, nan_to_num)
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_forward.default, args, options)


@pytest.mark.parametrize("use_triton", USE_TRITON)
def test_opcheck_norm_none_and_backward_op(use_triton):
    args, options = _op_args(use_triton, 1, False, norm="none")
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_forward.default, args, options)
    (x, r, columns, stats, _, _), options = _op_args(use_triton, 1, True)
    _, diff, finite = torch.ops.fusedvq.masked_mse_forward(x, r, columns, stats, None, None, **options)
    bwd_args = (torch.tensor(1.3), x.detach(), r.detach(), columns, stats, [diff.detach(), finite.detach()], None, None)
    needs = dict(needs_x=True, needs_target=True, needs_embeddings=False)
    torch.library.opcheck(torch.ops.fusedvq.masked_mse_backward.default, bwd_args, {**options, **needs})


def test_schemas_name_every_option():
    """Tensors positional, every option by name and keyword-only: no positional integer list, and the gap's
    first column and width named gap_at and gap_width."""
    ops = ("masked_mse", "batch_mse", "clean", "batch_clean")
    for name in [f"{op}_{way}" for op in ops for way in ("forward", "backward")]:
        arguments = getattr(torch.ops.fusedvq, name).default._schema.arguments
        positional = {a.name: str(a.type) for a in arguments if not a.kwarg_only}
        named = [a.name for a in arguments if a.kwarg_only]
        assert set(positional.values()) <= {"Tensor", "List[Tensor]", "Optional[Tensor]", "float", "str"}, name
        assert named[:2] == ["nan_to_num", "reduction"] or named == ["nan_to_num", "use_triton"], name
        if "mse" in name:
            assert named[:5] == ["nan_to_num", "reduction", "use_triton", "gap_at", "gap_width"], name
            assert positional["weight"] == "Optional[Tensor]" and positional["embeddings"] == "Optional[Tensor]"
        if "mse_backward" in name:
            assert named[5:] == ["needs_x", "needs_target", "needs_embeddings"], name


def _train_step_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask, mean, std = random_case(64, 187, 171, generator=g)
    model = torch.nn.Linear(32, 187, bias=False)  # (a layer around the op; no bias: no C++ build, seconds each)
    inp = torch.randn(64, 32, generator=g)
    recon = torch.randn(64, 171, generator=g)
    return model, inp, recon, mask, mean, std


# Inductor's C++ builds take seconds each: inductor compiles the module form on the PyTorch path; the
# functional form on the Triton kernels is traced with aot_eager (the same dynamo and AOTAutograd), as the
# other files trace each form and backend.
@pytest.mark.parametrize("form, backend, compiler", [("module", "reference", "inductor"), pytest.param(
    "functional", "triton", "aot_eager", marks=pytest.mark.skipif(not interpreting, reason="interpreter"))])
def test_compile_fullgraph_training_step(form, backend, compiler):
    torch._dynamo.reset()
    model, inp, recon, mask, mean, std = _train_step_setup()
    loss_mod = fusedvq.MaskedMSELoss(mask, mean, std, backend=backend)

    def step(inp, recon):  # forward graph compiled whole; AOTAutograd compiles its backward graph
        feats = model(inp)
        if form == "module":
            return loss_mod(feats, recon)
        return fusedvq.masked_mse(feats, recon, mask, mean, std, backend=backend)

    def oracle_step(inp, recon):
        feats = model(inp)
        return F.mse_loss(((feats - mean) / std)[:, mask], recon)

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    for trial in range(2):  # second call reuses the compiled graph
        model.zero_grad()
        loss = compiled(inp, recon + trial)
        loss.backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = oracle_step(inp, recon + trial)
        ref.backward()
        want = [p.grad for p in model.parameters()]
        assert rel_err(loss, ref) <= 1e-5
        assert all(rel_err(a, b) <= 1e-4 for a, b in zip(got, want))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.sweep)])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not interpreting, reason="interpreter"))])
def test_compiled_mask_target_mismatch_fails_instead_of_padding(backend, compiler):
    # Traced, value checks cannot stop the graph on the host; a device-side assertion must still refuse a
    # mask that keeps 4 columns against a 6-column target (never a silently padded loss). The traced graph
    # holds the assertion (aot_eager runs it); inductor's lowering of it into its C++ kernels is a sweep
    # (--sweeps: its first C++ build in a process takes 15 s and more of a core).
    torch._dynamo.reset()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:4] = True
    x, r = torch.randn(5, 10), torch.randn(5, 6)
    f = torch.compile(lambda x, r: fusedvq.masked_mse(x, r, mask, norm="none", backend=backend), fullgraph=True,
                      backend=compiler)
    with pytest.raises(RuntimeError, match="mask keeps a different number of columns"):
        f(x, r)


@pytest.mark.parametrize("call", ["loss", "cleaner", "recon_loss", "partials"])
def test_a_compiled_module_compiles_once(call):
    """The modules' held plans (and their small routes) exist from construction on and after .to(): a first
    call under torch.compile finds them and mutates nothing, so the second call reuses its graph (the bug: the
    first traced call built them, and the changed attribute made every module compile twice)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    mask, mean, std = random_case(9, 12, 7, generator=g)
    x, r = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g)
    loss_fn = fusedvq.MaskedMSELoss(mask, mean, std)
    cleaner = fusedvq.FeatureCleaner(mask, norm="batch")
    partials = fusedvq.PartialsMSELoss(mask, mean, std)
    step = {"loss": lambda x, r: loss_fn(x, r), "cleaner": lambda x, r: F.mse_loss(cleaner(x), r),
            "recon_loss": lambda x, r: cleaner.recon_loss(r, x[:, :7]),
            "partials": lambda x, r: partials(x, torch.stack([r, r + 1]))}[call]
    for module in (loss_fn, cleaner, partials):
        module.to(torch.float64).to(torch.float32)  # (.to() rebuilds them as construction does)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for trial in range(3):
        assert rel_err(compiled(x, r + trial), step(x, r + trial)) <= 1e-6
    assert counter.frame_count == 1
