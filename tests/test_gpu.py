"""CUDA-only behaviour: CUDA-graph capture and replay, a second device, compile on CUDA, no host sync."""

import pytest
import torch
import torch.nn.functional as F

import fusedvq
from oracle import batch_oracle, oracle, oracle_z, random_case, rel_err

pytestmark = pytest.mark.gpu


def _setup(B=512, D=187, K=171, device="cuda", seed=0, **case):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, generator=g, **case)
    x = torch.randn(B, D, generator=g).to(device)
    r = torch.randn(B, K, generator=g).to(device)
    return x, r, columns, mean, std


def _captured(loss_of, grad, *leaves):
    """(graph, static loss) of loss_of().backward(grad), captured after a warm-up on a side stream (the
    kernels compiled first), with the leaves' gradients reset so that capture allocates them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            loss_of().backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_of()
        loss.backward(grad)
    return graph, loss


def _replays(graph, x_static, r_static, times=3):
    """Fresh (x, r) copied into the static inputs, the graph replayed, `times` times: yields each (x, r)."""
    for _ in range(times):
        new_x, new_r = torch.randn_like(x_static), torch.randn_like(r_static)
        with torch.no_grad():
            x_static.copy_(new_x)
            r_static.copy_(new_r)
        graph.replay()
        torch.cuda.synchronize()
        yield new_x.detach(), new_r.detach()


@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_graph_capture_and_replay_forward_backward(reduction, norm):
    x, r, columns, mean, std = _setup(mask=False, duplicates=True)
    stats = (mean, std) if norm == "stats" else ()
    loss_fn = fusedvq.MaskedMSELoss(columns, *stats, num_features=187, norm=norm, reduction=reduction).cuda()
    x_static = x.clone().requires_grad_()
    r_static = r.clone().requires_grad_()
    g_shape = (512, 171) if reduction == "none" else ()
    grad_static = torch.full(g_shape, 0.75, device="cuda")

    graph, loss_static = _captured(lambda: loss_fn(x_static, r_static), grad_static, x_static, r_static)

    for new_x, new_r in _replays(graph, x_static, r_static):
        if norm == "stats":
            want, want_gx, want_gr = oracle(new_x, new_r, columns, mean, std, grad_static.cpu(), reduction=reduction)
        else:
            want, want_gx, want_gr = batch_oracle(new_x, new_r, columns, grad_static.cpu(), reduction=reduction)
        assert rel_err(loss_static, want) <= 1e-5
        assert rel_err(x_static.grad, want_gx) <= 1e-5
        assert rel_err(r_static.grad, want_gr) <= 1e-5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device():
    x, r, columns, mean, std = _setup(device="cuda:1")
    x.requires_grad_()
    loss = fusedvq.masked_mse(x, r, columns, mean, std)
    loss.backward()
    assert loss.device == torch.device("cuda:1") and x.grad.device == torch.device("cuda:1")
    want, want_gx, _ = oracle(x, r, columns, mean, std, torch.tensor(1.0))
    assert rel_err(loss, want) <= 1e-5 and rel_err(x.grad, want_gx) <= 1e-5


def test_compile_fullgraph_cuda():
    x, r, mask, mean, std = _setup()
    model = torch.nn.Linear(187, 187).cuda()
    loss_fn = fusedvq.MaskedMSELoss(mask, mean, std).cuda()
    step = torch.compile(lambda x, r: loss_fn(model(x), r), fullgraph=True)
    loss = step(x, r)
    loss.backward()
    got = model.weight.grad.clone()
    model.zero_grad()
    ref = F.mse_loss(((model(x) - mean.cuda()) / std.cuda())[:, mask.cuda()], r)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(got, model.weight.grad) <= 1e-4


@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync_in_module_forward_backward(norm, reduction):
    x, r, mask, mean, std = _setup()
    stats = (mean, std) if norm == "stats" else ()
    loss_fn = fusedvq.MaskedMSELoss(mask, *stats, norm=norm, reduction=reduction).cuda()
    x.requires_grad_()
    grad = torch.ones((512, 171) if reduction == "none" else (), device="cuda")
    loss_fn(x, r).backward(grad)  # warm-up (compiles the kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(x, r).backward(grad)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("norm", ["stats", "batch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_direct_launch_matches_tritons_own_launch(norm, reduction, monkeypatch):
    from fusedvq.kernels import batch_norm, launchers

    x, r, mask, mean, std = _setup(B=1000)
    stats = (mean, std) if norm == "stats" else ()
    loss_fn = fusedvq.MaskedMSELoss(mask, *stats, norm=norm, reduction=reduction).cuda()
    grad = torch.rand((1000, 171) if reduction == "none" else (), device="cuda")

    def step():
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        loss = loss_fn(xi, ri)
        loss.backward(grad)
        return loss.detach(), xi.grad, ri.grad

    step()  # compiles through Triton and caches the compiled kernels
    direct = step()
    assert launchers._FWD.compiled and launchers._BWD.compiled
    for launcher in (launchers._FWD, launchers._BWD, batch_norm._MOMENTS, batch_norm._DZ_SUMS):
        monkeypatch.setattr(launcher, "direct", False)
    through_triton = step()
    for a, b in zip(direct, through_triton):
        assert torch.equal(a, b)


def _clean_oracle(x, r, columns, mean, std, norm, grad):
    """float64 CPU composition of the VQ-led loss F.mse_loss(r, z): (loss, grad_x, grad_r)."""
    x64 = x.detach().double().cpu().requires_grad_()
    r64 = r.detach().double().cpu().requires_grad_()
    stats = (mean.double(), std.double()) if norm == "stats" else (None, None)
    loss = F.mse_loss(r64, oracle_z(x64, columns, *stats, norm))
    loss.backward(torch.as_tensor(grad, dtype=torch.float64))
    return loss.detach(), x64.grad, r64.grad


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_feature_cleaner_cuda_graph_capture_and_replay(norm):
    x, r, columns, mean, std = _setup(mask=False, duplicates=True)
    stats = (mean, std) if norm == "stats" else ()
    cleaner = fusedvq.FeatureCleaner(columns, *stats, num_features=187, norm=norm).cuda()
    x_static = x.clone().requires_grad_()
    r_static = r.clone().requires_grad_()
    grad_static = torch.full((), 0.75, device="cuda")

    graph, loss_static = _captured(lambda: F.mse_loss(r_static, cleaner(x_static)), grad_static, x_static, r_static)
    for new_x, new_r in _replays(graph, x_static, r_static):
        want, want_gx, want_gr = _clean_oracle(new_x, new_r, columns, mean, std, norm, 0.75)
        assert rel_err(loss_static, want) <= 1e-5
        assert rel_err(x_static.grad, want_gx) <= 1e-5
        assert rel_err(r_static.grad, want_gr) <= 1e-5


@pytest.mark.parametrize("norm", ["stats", "batch"])
def test_no_host_sync_in_feature_cleaner(norm):
    x, r, mask, mean, std = _setup()
    stats = (mean, std) if norm == "stats" else ()
    cleaner = fusedvq.FeatureCleaner(mask, *stats, norm=norm, nan_to_num=True).cuda()
    x.requires_grad_()
    F.mse_loss(r, cleaner(x)).backward()  # warm-up (compiles the kernels)
    torch.cuda.set_sync_debug_mode("error")
    try:
        F.mse_loss(r, cleaner(x)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("op", ["loss", "clean"])
def test_reference_ops_on_cuda_do_not_sync(op):
    """The registered ops' reference implementation (what torch.compile runs for backend="reference" on CUDA
    tensors) asks no finiteness question of the device: no host synchronization, forward or backward."""
    from fusedvq.arguments import prepare

    x, r, mask, _, _ = _setup(B=64)
    plan = prepare(mask.cuda(), options={"norm": "batch"}, num_features=187)
    x.requires_grad_()
    r.requires_grad_()
    columns, options = list(plan.columns), dict(nan_to_num=True, use_triton=False)
    loss_options = dict(options, reduction=1, gap_at=0, gap_width=0)
    run = (lambda: torch.ops.fusedvq.batch_mse_forward(x, r, columns, 1e-8, "", None, None, **loss_options)[0]
           ) if op == "loss" else (
        lambda: torch.ops.fusedvq.batch_clean_forward(x, columns, 1e-8, "", **options)[0].square().mean())
    run().backward()  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        run().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _training_setup(seed=0, B=4):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, 187, 171, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 187)).cuda()
    loss_fn = fusedvq.MaskedMSELoss(columns, mean, std, num_features=187).cuda()
    batches = [(torch.randn(B, 32, generator=g).cuda(), torch.randn(B, 171, generator=g).cuda()) for _ in range(20)]
    return model, loss_fn, batches


def _eager_reference(model, loss_fn, batches):
    """The same training, uncaptured: the parameters after every step."""
    import copy

    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for inp, recon in batches:
        opt.zero_grad(set_to_none=False)
        loss_fn(model(inp), recon).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_whole_training_step_captured_and_replayed_with_changing_data():
    # The README's recipe: warm up on a side stream, capture forward, backward and the optimizer step in one
    # CUDA graph, then copy each batch into the static inputs and replay.
    model, loss_fn, batches = _training_setup()
    want = _eager_reference(model, loss_fn, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    static_inp, static_recon = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up without changing the parameters (lr 0 steps would, with momentum)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(static_inp), static_recon).backward()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model(static_inp), static_recon)
        static_loss.backward()
        opt.step()
    # Capture recorded the step without running it: the parameters are still the initial ones.
    for inp, recon in batches:
        static_inp.copy_(inp)
        static_recon.copy_(recon)
        graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(model.parameters(), want):
        assert rel_err(got.detach(), ref) <= 1e-5


def test_reduce_overhead_compile_has_no_cudagraph_skips():
    from torch._dynamo.utils import counters

    model, loss_fn, batches = _training_setup(seed=1)
    want = _eager_reference(model, loss_fn, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda inp, recon: loss_fn(model(inp), recon), mode="reduce-overhead", fullgraph=True)
    for inp, recon in batches:
        opt.zero_grad(set_to_none=False)
        step(inp, recon).backward()
        opt.step()
    torch.cuda.synchronize()
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    for got, ref in zip(model.parameters(), want):
        assert rel_err(got.detach(), ref) <= 1e-4
