"""The functional forms' plan cache (arguments.PLAN_CACHE, looked up in loss.py): a repeated call, or one with
the tensors a module was built from, skips arguments.prepare and gives bit-identical results; a tensor
written in place, swapped through .data, or a new tensor under a dead one's id is validated again; options
of another type never share a plan; values follow the float64 oracle."""

import pytest
import torch

import fusedvq
from fusedvq import arguments
from fusedvq import clean as clean_module
from fusedvq import loss as loss_module
from fusedvq import partials as partials_module
from oracle import TOLERANCE, oracle, partials_oracle, random_case, rel_err

D, K, B = 13, 9, 4


@pytest.fixture(autouse=True)
def empty_cache():
    arguments.PLAN_CACHE.clear()
    yield
    arguments.PLAN_CACHE.clear()


@pytest.fixture
def prepared(monkeypatch):
    """The number of arguments.prepare calls the functional forms make (a list: one entry per call)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return arguments.prepare(*args, **kwargs)

    for module in (loss_module, clean_module, partials_module):
        monkeypatch.setattr(module, "prepare", counted)
    return calls


def _case(seed=0, dtype=torch.float32, mask=True):
    g = torch.Generator().manual_seed(seed)
    columns, mean, std = random_case(B, D, K, mask=mask, generator=g)
    x = torch.randn(B, D, generator=g, dtype=dtype, requires_grad=True)
    r = torch.randn(B, K, generator=g, dtype=dtype, requires_grad=True)
    return x, r, columns, mean, std


def _run(x, r, *args, **kwargs):
    """(loss, grad_x, grad_r) of masked_mse."""
    x.grad = r.grad = None
    loss = fusedvq.masked_mse(x, r, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad.clone(), r.grad.clone()


def _check_oracle(got, x, r, columns, mean, std, **kwargs):
    want = oracle(x, r, columns, mean, std, torch.tensor(1.0), **kwargs)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOLERANCE[x.dtype]


def _identical(a, b):
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask", [True, False])
def test_a_repeated_call_skips_prepare_and_gives_the_same_bits(prepared, dtype, mask):
    x, r, columns, mean, std = _case(dtype=dtype, mask=mask)
    first = _run(x, r, columns, mean, std)
    second = _run(x, r, columns, mean, std)
    assert len(prepared) == 1
    _identical(first, second)
    _check_oracle(second, x, r, columns, mean, std)
    arguments.PLAN_CACHE.clear()
    _identical(_run(x, r, columns, mean, std), second)  # the uncached path


def test_clean_features_and_partials_mse_share_one_plan(prepared):
    x, _, columns, mean, std = _case()
    z = fusedvq.clean_features(x, columns, mean, std)
    assert torch.equal(fusedvq.clean_features(x, columns, mean, std), z)
    partials = torch.randn(2, B, K)
    got = fusedvq.partials_mse(x, partials, columns, mean, std)
    assert len(prepared) == 1
    want = partials_oracle(x, partials, columns, mean, std, "stats", torch.tensor(1.0))[0]
    assert rel_err(got, want) <= TOLERANCE[torch.float32]


def _equal_plans(a, b):
    tensors = lambda p: (*p.columns, p.shift, p.scale, p.weight)  # noqa: E731
    assert a._replace(columns=None, shift=None, scale=None, weight=None) == b._replace(
        columns=None, shift=None, scale=None, weight=None)
    for u, v in zip(tensors(a), tensors(b)):
        assert (u is None) == (v is None)
        assert u is None or (u.dtype == v.dtype and u.device == v.device and u.stride() == v.stride()
                             and torch.equal(u, v))


@pytest.mark.parametrize("kwargs", [{}, {"reduction": "column", "weight": torch.linspace(0.5, 2, K)},
                                    {"stats_space": "masked", "nan_to_num": True}, {"mask": False}])
def test_a_module_caches_the_plan_the_functional_form_would_build(prepared, kwargs):
    kwargs = dict(kwargs)
    x, r, columns, mean, std = _case(mask=kwargs.pop("mask", True))
    if kwargs.get("stats_space") == "masked":
        mean, std = mean[:K].clone(), std[:K].clone()
    num_features = None if columns.dtype == torch.bool else D
    module = fusedvq.MaskedMSELoss(columns, mean, std, num_features=num_features, **kwargs)
    module.scale.mul_(2)  # the module's buffers are its own: the cached plan is a copy
    prepared.clear()  # (the constructor's own)
    x.grad = r.grad = None
    loss = fusedvq.masked_mse(x, r, columns, mean, std, **kwargs)
    loss.sum().backward()
    hit = (loss.detach(), x.grad.clone(), r.grad.clone())
    assert not prepared
    options = {k: v for k, v in kwargs.items() if k not in ("reduction", "weight")}
    form = arguments.LossForm(kwargs.get("reduction", "mean"), weight=kwargs.get("weight"))
    built = arguments.prepare(columns, mean, std, {"norm": "stats", **options}, num_features=D, num_kept=K,
                              form=form, device=x.device, dtype=torch.float32)  # as masked_mse calls it
    _equal_plans(next(reversed(arguments.PLAN_CACHE.values())).plan, built)
    arguments.PLAN_CACHE.clear()
    x.grad = r.grad = None
    loss = fusedvq.masked_mse(x, r, columns, mean, std, **kwargs)
    loss.sum().backward()
    assert len(prepared) == 1
    _identical(hit, (loss.detach(), x.grad, r.grad))


def test_a_cleaner_caches_clean_features_plan_and_a_gap_or_float64_misses(prepared):
    x, r, columns, mean, std = _case()
    fusedvq.FeatureCleaner(columns, mean, std)
    prepared.clear()  # (the constructor's own)
    fusedvq.clean_features(x, columns, mean, std)
    assert not prepared
    fusedvq.MaskedMSELoss(columns, mean, std, target_gap=(2, 3))  # not masked_mse's plan: not cached as it
    prepared.clear()
    _run(x, r, columns, mean, std)
    assert len(prepared) == 1
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    got = _run(x64, r64, columns, mean, std)  # float64 features: float64 statistics, not the float32 plan's
    assert len(prepared) == 2
    _check_oracle(got, x64, r64, columns, mean, std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_writes_in_place_are_seen(prepared, dtype):
    x, r, columns, mean, std = _case(dtype=dtype)
    _run(x, r, columns, mean, std)
    kept = columns.nonzero().squeeze(1)
    mean[kept[0]] += 1.5
    with torch.no_grad():
        std.mul_(2)
    _check_oracle(_run(x, r, columns, mean, std), x, r, columns, mean, std)
    columns[kept[1]], columns[(~columns).nonzero()[0, 0]] = False, True  # the same K, another column
    _check_oracle(_run(x, r, columns, mean, std), x, r, columns, mean, std)
    std[columns.nonzero()[0, 0]] = 0.0
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        _run(x, r, columns, mean, std)
    with pytest.raises(ValueError, match="std must be finite and > 0"):  # (nothing cached from a failed call)
        _run(x, r, columns, mean, std)
    assert len(prepared) == 5


def test_an_integer_index_written_in_place_is_seen():
    x, r, columns, mean, std = _case(mask=False)
    _run(x, r, columns, mean, std)
    columns[0] = (columns[0] + 1) % D
    _check_oracle(_run(x, r, columns, mean, std), x, r, columns, mean, std)


def test_a_data_swap_is_seen_however_often():
    x, r, columns, mean, std = _case()
    for step in range(20):  # (a freed buffer's address is soon reused: only the version is kept across .data)
        mean.data = torch.full((D,), float(step))
        _check_oracle(_run(x, r, columns, mean, std), x, r, columns, mean, std)


def test_a_new_tensor_under_a_dead_ones_id_is_validated_again():
    x, r, columns, mean, std = _case()
    values, seen, reused = mean.numpy().copy(), set(), False
    for step in range(40):  # from_numpy: a new tensor on the same memory, version 0, each time
        values[:] = step
        m = torch.from_numpy(values)
        reused |= id(m) in seen
        seen.add(id(m))
        _check_oracle(_run(x, r, columns, m, std), x, r, columns, m, std)
        del m  # (freed at once: its id free for the next one)
    assert reused  # (else this test would not have tried what it is about)


@pytest.mark.parametrize("name, good, bad", [("nan_to_num", True, 1), ("nan_to_num", False, "False"),
                                             ("nan_to_num", False, 0), ("eps", 1, True)])
def test_options_of_another_type_never_share_a_plan(name, good, bad):
    x, r, columns, mean, std = _case()
    _run(x, r, columns, mean, std, **{name: good})
    with pytest.raises(TypeError, match=f"{name} must be"):
        _run(x, r, columns, mean, std, **{name: bad})
    with pytest.raises(TypeError, match=f"{name} must be"):
        fusedvq.clean_features(x, columns, mean, std, **{name: bad})


def test_requires_grad_set_later_is_refused_again():
    x, r, columns, mean, std = _case()
    _run(x, r, columns, mean, std)
    mean.requires_grad_()
    with pytest.raises(ValueError, match="mean requires grad"):
        _run(x, r, columns, mean, std)


def test_other_widths_and_targets_are_checked():
    x, r, columns, mean, std = _case(mask=False)
    mean_k, std_k = mean[columns].clone(), std[columns].clone()  # (per kept column: any D takes them)
    _check_oracle(_run(x, r, columns, mean_k, std_k), x, r, columns, mean, std)
    wider = torch.randn(B, D + 3, requires_grad=True)
    raw = [torch.ones(D + 3).index_put_((columns,), t) for t in (mean_k, std_k)]
    _check_oracle(_run(wider, r, columns, mean_k, std_k), wider, r, columns, *raw)
    with pytest.raises(ValueError, match=f"{K + 1} columns"):
        _run(x, torch.randn(B, K + 1, requires_grad=True), columns, mean_k, std_k)
    with pytest.raises(TypeError, match="float64"):
        _run(x, r.detach().double().requires_grad_(), columns, mean_k, std_k)


def test_inference_mode_transforms_and_synced_statistics_are_not_cached(prepared):
    x, r, columns, mean, std = _case()
    with torch.inference_mode():
        fusedvq.masked_mse(x, r, columns, mean, std)
    assert not arguments.PLAN_CACHE
    _check_oracle(_run(x, r, columns, mean, std), x, r, columns, mean, std)  # (autograd saves its tensors)
    assert len(prepared) == 2
    keys = []
    torch.func.vmap(lambda t: keys.append(loss_module.plan_key("loss", t[None], r[:1], (columns, mean, std, None),
                                                                {"norm": "stats"})) or t.sum())(x.detach())
    assert keys == [None]  # (under torch.func)
    synced = {"norm": "batch", "sync_stats": True}
    assert loss_module.plan_key("loss", x, r, (columns, None, None, None), synced) is None
    assert loss_module.plan_key("loss", x, r, (columns.tolist(), mean, std, None), {"norm": "stats"}) is None


def test_the_cache_is_bounded():
    x, r, _, mean, std = _case()
    for seed in range(3 * arguments.PLAN_CACHE_SIZE):
        columns = random_case(B, D, K, generator=torch.Generator().manual_seed(seed))[0]
        fusedvq.masked_mse(x, r, columns, mean, std)
    assert len(arguments.PLAN_CACHE) == arguments.PLAN_CACHE_SIZE


@pytest.mark.gpu
def test_another_device_has_its_own_plan():
    x, r, columns, mean, std = _case()
    _run(x, r, columns, mean, std)
    xc, rc = (t.detach().cuda().requires_grad_() for t in (x, r))
    _check_oracle(_run(xc, rc, columns, mean, std), xc, rc, columns, mean, std)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedvq.masked_mse(xc, rc, columns, mean, std)  # a hit: no host synchronization
    finally:
        torch.cuda.set_sync_debug_mode("default")
