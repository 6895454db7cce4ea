"""What the bounded child sends back is what torch.load reads: values, dtypes, strides, memory order, and
identity (an object referenced twice in a file, as torch.save writes tied weights or statistics reused under
two names, comes back as one object referenced twice). Values a weights-only read accepts are read, a class
no allow-list knows is read as a record, and what is refused is refused for its own reason."""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch

from ckpt_factory import checkpoint_dict, make_plain_run, make_run, write_checkpoint
from hostile_files import as_checkpoint, global_
from fusedvq.checkpoint import CheckpointError, load_feature_spec, read_checkpoint


def assert_same_graph(got, ref, seen=None, storages=None, where="root"):
    """got equals ref as torch.load returns it: the same types, values, dtypes, shapes, strides and memory order,
    and the same sharing (one object wherever ref has one object; one storage wherever ref shares one)."""
    seen = {} if seen is None else seen
    storages = {} if storages is None else storages
    if ref is None or type(ref) in (bool, int, float, complex, str, bytes):
        assert type(got) is type(ref) and got == ref, where
        return
    if id(ref) in seen:
        assert seen[id(ref)] is got, f"{where}: a second reference is not the same object"
        return
    assert all(other is not got for other in seen.values()), f"{where}: two objects in the file became one"
    seen[id(ref)] = got
    if isinstance(ref, torch.Tensor):
        assert type(got) is torch.Tensor and got.dtype == ref.dtype, where
        assert got.shape == ref.shape and got.stride() == ref.stride(), where
        assert got.storage_offset() == ref.storage_offset() and torch.equal(got, ref), where
        key = ref.untyped_storage().data_ptr()
        assert storages.setdefault(key, got.untyped_storage().data_ptr()) == got.untyped_storage().data_ptr(), where
    elif isinstance(ref, np.ndarray):
        assert type(got) is np.ndarray and got.dtype == ref.dtype and got.shape == ref.shape, where
        assert got.strides == ref.strides or not ref.size, where  # (an empty array's strides mean nothing)
        assert np.array_equal(got, ref), where
    elif isinstance(ref, np.generic):
        assert type(got) is type(ref) and got == ref, where
    elif isinstance(ref, dict):
        assert type(got) is type(ref) and list(got) == list(ref), where
        for key in ref:
            assert_same_graph(got[key], ref[key], seen, storages, f"{where}[{key!r}]")
    elif isinstance(ref, (list, tuple)):
        assert type(got) is type(ref) and len(got) == len(ref), where
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_same_graph(a, b, seen, storages, f"{where}[{i}]")
    elif isinstance(ref, set):
        assert type(got) is set and got == ref, where
    else:
        assert got == ref, where


def shared_checkpoint() -> dict:
    """A checkpoint with every kind of sharing torch.save writes as one object and several references."""
    parts = make_plain_run(D=30, K=20, num_categories=2, sizes=[10, 10])
    ckpt = checkpoint_dict(parts)
    weight = torch.randn(20, 16)
    ckpt["model_state_dict"] = OrderedDict({"encoder.weight": weight, "decoder.weight": weight,  # tied weights
                                            "decoder.weight_t": weight.t(), "bias": torch.zeros(20)[::2]})
    ckpt["feature_mask"] = torch.from_numpy(parts.mask)
    ckpt["mask_again"] = ckpt["feature_mask"]  # a mask stored twice
    stats = ckpt["normalization_stats"]
    stats["cluster_2"] = stats["cluster_1"]  # statistics reused under a second name (one dict)
    ckpt["scale"] = {"a": stats["cluster_1"]["std"], "b": stats["cluster_1"]["std"]}  # one array, twice
    ckpt["fortran"] = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    ckpt["empty"], ckpt["empty 2-d"] = np.zeros(0), np.zeros((0, 3), np.float32)
    ckpt["complex"], ckpt["set"] = 1 + 2j, {1, "two", (3, 4)}
    return ckpt


def test_a_checkpoint_with_shared_references_reads_back_as_torch_load_reads_it(tmp_path):
    path = tmp_path / "best_model.pt"
    torch.save(shared_checkpoint(), path)
    ref = torch.load(path, weights_only=False)  # (the file is the test's own)
    got = read_checkpoint(path)
    assert got["model_state_dict"]["encoder.weight"] is got["model_state_dict"]["decoder.weight"]
    assert got["mask_again"] is got["feature_mask"]
    assert_same_graph(got, ref)


def test_what_comes_back_is_what_torch_load_reads(tmp_path):
    base = torch.randn(4, 5, dtype=torch.float64)
    shared = [1, 2.5, "three"]
    data = {
        "strided": base.t(), "view": base[1:, 2:], "same storage": base, "stride 0": torch.zeros(1).expand(7),
        "bf16": torch.randn(3).bfloat16(), "bool": torch.rand(9) > 0.5, "int": torch.arange(5, dtype=torch.int16),
        "param": torch.nn.Parameter(torch.ones(2)), "empty": torch.empty(0, 3),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float64(2.5), "strings": np.array(["a", "bc"]),
        "dtype": torch.float16, "nested": {"a": shared, "b": shared, 7: (None, True, b"bytes", 2**80)},
    }
    torch.save(data, tmp_path / "data.pt")
    got, ref = read_checkpoint(tmp_path / "data.pt"), torch.load(tmp_path / "data.pt", weights_only=False)
    assert got["param"].requires_grad
    got["param"], ref["param"] = got["param"].detach(), ref["param"].data  # (a plain tensor that requires grad)
    assert_same_graph(got, ref)  # one storage and one shared list, as in the file


def test_tensors_only_read_back_as_weights_only_reads_them(tmp_path):
    base = torch.randn(6, 4, dtype=torch.float64)
    data = {"a": base, "b": base, "t": base.t(), "row": base[2], "zero stride": torch.ones(1).expand(5),
            "pair": (base, base[1:]), "param": torch.nn.Parameter(torch.ones(3)), "c": 1 + 2j, "s": {1, 2},
            "state": torch.nn.Linear(2, 3).state_dict(), "counts": Counter("abca")}
    torch.save(data, tmp_path / "t.pt")
    ref = torch.load(tmp_path / "t.pt", weights_only=True)
    got = read_checkpoint(tmp_path / "t.pt")
    ref["param"] = ref["param"].data  # (a parameter comes back as a plain tensor that requires grad)
    assert got["param"].requires_grad
    got["param"] = got["param"].detach()
    assert_same_graph(got, ref)


def test_shared_mask_and_statistics_build_the_spec(tmp_path):
    ckpt = shared_checkpoint()
    torch.save(ckpt, tmp_path / "best_model.pt")
    spec = load_feature_spec(tmp_path / "best_model.pt", num_features=30)
    groups = ckpt["model_config"]["group_indices"]
    one = ckpt["normalization_stats"]["cluster_1"]
    expected = np.empty(20)
    for idx in groups.values():
        expected[idx] = one["mean"]
    assert torch.equal(spec.feature_mask, ckpt["feature_mask"]) and np.array_equal(spec.mean.numpy(), expected)


def test_a_container_type_torch_does_not_read_is_refused_for_that_reason(tmp_path):
    torch.save({"feature_mask": np.ones(3, bool), "x": frozenset({1})}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="frozenset is a container type") as info:
        read_checkpoint(tmp_path / "f.pt")
    assert "could run code" not in str(info.value)


def test_bytes_called_with_a_size_is_refused_by_the_scan(tmp_path):
    path = as_checkpoint(tmp_path / "b.pt", global_("__builtin__", "bytes") + b"J\x00\x00\x00\x40\x85R")
    with pytest.raises(CheckpointError, match=r"calls bytes\(\.\.\.\) with arguments"):
        read_checkpoint(path)


def test_a_quantized_tensor_is_said_to_be_one(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.ones(30), 0.5, 0, torch.qint8)
    parts = make_plain_run(D=30, K=20, num_categories=2)
    ckpt = checkpoint_dict(parts)
    ckpt["model_state_dict"]["decoder.weight"] = quantized  # a quantized model's weights: the mask still reads
    torch.save(ckpt, tmp_path / "best_model.pt")
    assert load_feature_spec(tmp_path / "best_model.pt").num_kept == 20
    ckpt["feature_mask"] = quantized
    torch.save(ckpt, tmp_path / "best_model.pt")
    with pytest.raises(CheckpointError, match="feature_mask is a quantized qint8 tensor") as info:
        load_feature_spec(tmp_path / "best_model.pt")
    assert "strided" not in str(info.value)


class Unknown:
    """A class no allow-list knows."""


def a_function():
    """A global a pickle can only call: never given a stand-in."""


def test_refusal_names_only_refused_globals(tmp_path):
    data = checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2))
    data["model_config"] = OrderedDict(data["model_config"])
    data["extra"] = [Unknown(), a_function]
    torch.save(data, tmp_path / "best_model.pt")
    with pytest.raises(CheckpointError) as info:
        load_feature_spec(tmp_path)
    message = str(info.value)
    assert "a_function is a function" in message
    assert "OrderedDict" not in message and "Unknown" not in message  # allowed, and read as a record


def test_unknown_class_is_read_as_a_record(tmp_path):
    from fusedvq.checkpoint.records import ForeignObject

    data = checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2))
    data["extra"] = Unknown()
    data["extra"].payload = np.arange(3)
    torch.save(data, tmp_path / "best_model.pt")
    spec = load_feature_spec(tmp_path)
    assert spec.num_kept == 12
    record = read_checkpoint(tmp_path / "best_model.pt")["extra"]
    assert isinstance(record, ForeignObject) and not isinstance(record, Unknown)
    assert record.class_name.endswith(".Unknown") and list(record.attributes) == ["payload"]
    assert np.array_equal(record.attributes["payload"], np.arange(3))


def test_object_array_refusal_says_why(tmp_path):
    data = checkpoint_dict(make_plain_run(D=20, K=12, num_categories=2))
    data["extra"] = np.array([1, "a", None], dtype=object)
    torch.save(data, tmp_path / "best_model.pt")
    with pytest.raises(CheckpointError, match="dtype object"):
        load_feature_spec(tmp_path)


def test_a_real_checkpoint_with_a_few_foreign_classes_still_loads(tmp_path):
    path = write_checkpoint(tmp_path, make_run(hybrid=True, seed=3))
    assert load_feature_spec(path).hybrid is not None
