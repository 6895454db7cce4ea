"""Every public option keeps its kind: flags are True / False (or numpy booleans), counts are integers,
keywords are ones the form takes, tensors are tensors, a FeatureSpec goes to from_spec. Each refusal names
the argument and the value (a string "False" read from a config file must never be truthy); eps is a finite
number > 0, an option's value one it takes, and a form refuses the options of another."""

import inspect
import io
import re

import numpy as np
import pytest
import torch
from ckpt_factory import make_plain_run, make_run, write_checkpoint

import fusedvq
from fusedvq import FeatureCleaner, MaskedMSELoss, VQReconLoss
from fusedvq.arguments import OPTIONS
from fusedvq.tools.cli import check
from helpers import raises
from oracle import oracle_z, rel_err

NOT_FLAGS = ["False", "no", "", 0, 1, 1.0, None, torch.tensor(True), np.array([True])]
NOT_COUNTS = ["10", True, np.True_, 10.0, 10.5, np.float64(10.0), torch.tensor(10)]


def _case(seed=0, D=9, K=5, B=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(D, dtype=torch.bool)
    mask[torch.randperm(D, generator=g)[:K]] = True
    return torch.randn(B, D, generator=g), torch.randn(B, K, generator=g), mask


def _message(*fragments):
    return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)


FLAG_CALLS = {
    "masked_mse": lambda x, r, m, **kw: fusedvq.masked_mse(x, r, m, norm="batch", **kw),
    "clean_features": lambda x, r, m, **kw: fusedvq.clean_features(x, m, norm="batch", **kw),
    "MaskedMSELoss": lambda x, r, m, **kw: MaskedMSELoss(m, norm="batch", **kw)(x, r),
    "VQReconLoss": lambda x, r, m, **kw: VQReconLoss(m, norm="batch", **kw)(x, r),
    "FeatureCleaner": lambda x, r, m, **kw: FeatureCleaner(m, norm="batch", **kw)(x),
}


@pytest.mark.parametrize("form", FLAG_CALLS)
@pytest.mark.parametrize("flag", ["nan_to_num", "sync_stats"])
def test_flags_take_booleans_only(form, flag):
    x, r, mask = _case()
    for bad in NOT_FLAGS:
        with pytest.raises(TypeError, match=_message(f"{flag} must be True or False", repr(bad))):
            FLAG_CALLS[form](x, r, mask, **{flag: bad})
    x[0, mask.nonzero()[0]] = float("nan")  # (nan_to_num changes the result)
    for plain, numpy_bool in ((True, np.True_), (False, np.False_)):
        if flag == "sync_stats" and plain:
            continue  # (needs a process group)
        want = FLAG_CALLS[form](x, r, mask, **{flag: plain})
        got = FLAG_CALLS[form](x, r, mask, **{flag: numpy_bool})
        assert torch.equal(got, want) or (torch.isnan(got).any() and torch.equal(got.isnan(), want.isnan()))
    z = FLAG_CALLS["clean_features"](x, r, mask, nan_to_num=np.True_)
    assert rel_err(z, oracle_z(x.double(), mask, None, None, "batch", nan_to_num=True)) <= 1e-5


@pytest.mark.parametrize("eps", ["1e-8", float("nan"), float("inf"), -1e-8, None, True, torch.tensor(1e-8)])
def test_eps_validated_before_launch(eps):
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    with raises((TypeError, ValueError), "eps"):
        fusedvq.masked_mse(x, r, torch.arange(6), norm="batch", eps=eps)
    with raises((TypeError, ValueError), "eps"):
        fusedvq.MaskedMSELoss(torch.ones(6, dtype=torch.bool), norm="batch", eps=eps)


@pytest.mark.parametrize("cls", [MaskedMSELoss, VQReconLoss, FeatureCleaner])
def test_trust_and_num_features_are_checked_before_the_file_is_read(cls, tmp_path):
    parts = make_plain_run(D=20, K=12, num_categories=2, seed=3)
    path = write_checkpoint(tmp_path, parts)
    for bad in NOT_FLAGS:
        with pytest.raises(TypeError, match=_message("trust must be True or False", repr(bad))):
            cls.from_checkpoint(path, trust=bad)
    for bad in NOT_COUNTS:
        with pytest.raises(TypeError, match=_message("num_features must be an integer", repr(bad))):
            cls.from_checkpoint(path, num_features=bad)
    module = cls.from_checkpoint(path, trust=np.False_, num_features=np.int64(20))
    assert module.num_features == 20 and module.num_kept == 12


@pytest.mark.parametrize("cls", [MaskedMSELoss, VQReconLoss, FeatureCleaner])
def test_num_features_and_target_gap_are_integers(cls):
    index = torch.tensor([0, 2, 3])
    for bad in NOT_COUNTS:
        with pytest.raises(TypeError, match=_message("num_features must be an integer", repr(bad))):
            cls(index, norm="none", num_features=bad)
    assert cls(index, norm="none", num_features=np.int32(5)).num_features == 5
    if cls is not FeatureCleaner:
        gapped = cls(index, norm="none", num_features=5, target_gap=(np.int64(1), np.int64(2)))
        assert (gapped.loss if cls is VQReconLoss else gapped).target_gap == (1, 2)
        for bad in [(1.0, 2), (True, 2), (1, "2")]:
            with pytest.raises(ValueError, match="target_gap must be"):
                cls(index, norm="none", num_features=5, target_gap=bad)


def test_the_check_command_takes_a_boolean_trust_and_an_integer_width(tmp_path):
    path = str(write_checkpoint(tmp_path, make_plain_run(D=20, K=12, num_categories=2, seed=4)))
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(TypeError, match=_message("trust must be True or False", "'False'")):
        check(path, trust="False", out=out, err=err)
    with pytest.raises(TypeError, match=_message("features must be an integer", "'20'")):
        check(path, features="20", out=out, err=err)
    assert check(path, features=np.int64(20), trust=np.False_, out=out, err=err) == 0


def test_missing_tensors_are_named():
    x, r, mask = _case()
    cases = {
        "features must be a torch.Tensor, got NoneType": [
            lambda: fusedvq.masked_mse(None, r, mask, norm="none"), lambda: fusedvq.clean_features(None, mask, norm="none"),
            lambda: MaskedMSELoss(mask, norm="none")(None, r), lambda: FeatureCleaner(mask, norm="none")(None),
            lambda: VQReconLoss(mask, norm="none")(None, r)],
        "target must be a torch.Tensor": [
            lambda: fusedvq.masked_mse(x, None, mask, norm="none"), lambda: MaskedMSELoss(mask, norm="none")(x, None)],
        "recon must be a torch.Tensor, got NoneType": [
            lambda: VQReconLoss(mask, norm="none")(x, None),
            lambda: FeatureCleaner(mask, norm="none").recon_loss(None, r)],
    }
    for message, calls in cases.items():
        for call in calls:
            with pytest.raises(TypeError, match=re.escape(message)):
                call()


def test_a_feature_spec_goes_to_from_spec():
    _, _, mask = _case()
    spec = fusedvq.load_feature_spec(feature_mask=mask.numpy(), require_stats=False)
    for cls in (MaskedMSELoss, VQReconLoss, FeatureCleaner):
        with pytest.raises(TypeError, match=_message("FeatureSpec", f"{cls.__name__}.from_spec(spec)")):
            cls(spec, norm="none")
        with pytest.raises(TypeError, match=_message(f"{cls.__name__}.from_spec takes a FeatureSpec", "got dict",
                                                     f"{cls.__name__}.from_checkpoint(path)")):
            cls.from_spec({"feature_mask": mask}, norm="none")
        with pytest.raises(TypeError, match=_message("takes a checkpoint path, got a FeatureSpec",
                                                     f"{cls.__name__}.from_spec(spec)")):
            cls.from_checkpoint(spec)
        assert cls.from_spec(spec, norm="none").num_kept == int(mask.sum())
    with pytest.raises(TypeError, match=_message("index is a FeatureSpec", ".from_spec(spec)", "spec.feature_mask")):
        fusedvq.masked_mse(torch.randn(2, 9), torch.randn(2, 5), spec, norm="none")
    with pytest.raises(TypeError, match=_message("index is a FeatureSpec", ".from_spec(spec)", "spec.feature_mask")):
        fusedvq.clean_features(torch.randn(2, 9), spec, norm="none")


def _keywords(fn) -> set:
    """The names a form takes by keyword (its own parameters and, through **options, OPTIONS)."""
    params = inspect.signature(fn).parameters.values()
    own = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("_")}
    return (own | set(OPTIONS)) - {"self", "features", "target"}


FORMS = {
    "masked_mse": (fusedvq.masked_mse, lambda x, r, m, **kw: fusedvq.masked_mse(x, r, m, norm="none", **kw)),
    "clean_features": (fusedvq.clean_features, lambda x, r, m, **kw: fusedvq.clean_features(x, m, norm="none", **kw)),
    "MaskedMSELoss": (MaskedMSELoss.__init__, lambda x, r, m, **kw: MaskedMSELoss(m, norm="none", **kw)),
    "VQReconLoss": (None, lambda x, r, m, **kw: VQReconLoss(m, norm="none", **kw)),
    "FeatureCleaner": (FeatureCleaner.__init__, lambda x, r, m, **kw: FeatureCleaner(m, norm="none", **kw)),
}


@pytest.mark.parametrize("form", FORMS)
def test_an_unknown_option_lists_every_option_and_points_a_near_miss(form):
    x, r, mask = _case()
    fn, call = FORMS[form]
    taken = _keywords(fn) if fn is not None else _keywords(MaskedMSELoss.__init__) - {"index"} | {"feature_mask",
                                                                                                      "categories"}
    if form != "clean_features" and form != "FeatureCleaner":
        taken |= {"reduction"}
    with pytest.raises(TypeError) as info:
        call(x, r, mask, nan2num=True)
    listed = set(str(info.value).split(" takes ")[1].split(", "))
    assert f"{form} takes" in str(info.value) and taken <= listed, taken - listed
    assert "(did you mean nan_to_num=?)" in str(info.value)
    if "reduction" in taken:
        with pytest.raises(TypeError, match=re.escape("unknown option 'reduce' (did you mean reduction=?)")):
            call(x, r, mask, reduce="sum")


def test_a_hybrid_decoders_whole_output_names_its_width_and_the_fix(tmp_path):
    path = write_checkpoint(tmp_path, make_run(hybrid=True, seed=5))
    recon_loss = VQReconLoss.from_checkpoint(path, norm="batch")
    loss_fn = MaskedMSELoss.from_checkpoint(path, norm="batch")
    (p, c), K, width = recon_loss.loss.target_gap, loss_fn.num_kept, recon_loss.recon_width
    g = torch.Generator().manual_seed(6)
    x, recon = torch.randn(4, recon_loss.num_features, generator=g), torch.randn(4, width, generator=g)
    with pytest.raises(ValueError, match=_message(f"target has {width} columns", f"compares the {K} kept feature",
                                                  f"decoder outputs {width} columns", f"target_gap=({p}, {c})",
                                                  "VQReconLoss.from_checkpoint")):
        loss_fn(x, recon)
    gapped = MaskedMSELoss.from_checkpoint(path, norm="batch", target_gap=(p, c))
    assert torch.equal(gapped(x, recon), recon_loss(x, recon))
    assert torch.equal(loss_fn(x, torch.cat([recon[:, :p], recon[:, p + c:]], 1)), recon_loss(x, recon))


@pytest.mark.parametrize("option,value", [("reduction", "avg"), ("norm", "layer"), ("backend", "cuda")])
def test_unknown_options(option, value):
    x, r, mask = _case()
    with raises(ValueError, f"unknown {option}={value!r}"):
        fusedvq.masked_mse(x, r, mask, **{"norm": "none", option: value})


def test_options_of_another_form_are_refused():
    x, mask = torch.randn(8, 6), torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    with pytest.raises(TypeError, match="unknown option 'reduction'"):
        fusedvq.clean_features(x, mask, norm="none", reduction="sum")
    with pytest.raises(TypeError, match="unknown option 'gap'"):
        fusedvq.masked_mse(x, torch.randn(8, 4), mask, norm="none", gap=(1, 2))
    for name, value in (("target_gap", (1, 2)), ("reduction", "sum")):
        with pytest.raises(TypeError, match=f"unknown option '{name}'"):
            FeatureCleaner(mask, norm="none", **{name: value})
