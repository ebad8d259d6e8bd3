"""dpojax.weights.torch_pickle against torch.save: the same arrays back without torch, and bad files refused."""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import pytest
import torch

from dpojax.weights.torch_pickle import read_checkpoint, read_state_dict


def _saved(tmp_path, obj, name="ckpt.pt", **kwargs):
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def test_every_dtype_and_view_round_trips(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    state = collections.OrderedDict({
        "float32": torch.randn(3, 4), "float16": torch.randn(7).half(), "int64": torch.arange(5),
        "int8": torch.tensor([-3, 4], dtype=torch.int8), "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
        "transposed": base.t(), "sliced": base[1:4, ::2],  # views sharing one storage, non-contiguous
        "parameter": torch.nn.Parameter(torch.randn(2, 2)),
    })
    bf16 = torch.randn(4).bfloat16()
    path = _saved(tmp_path, {"state_dict": {**state, "bf16": bf16}, "epoch": 3, "name": "run"})
    loaded = read_state_dict(path, "test checkpoint", key="state_dict")
    assert set(loaded) == {*state, "bf16"}
    for name, tensor in state.items():
        expected = tensor.detach().numpy()
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected, err_msg=name)
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded["bf16"].astype(np.float32), bf16.float().numpy())
    top = read_checkpoint(path, "test checkpoint")
    assert top["epoch"] == 3 and top["name"] == "run"


def test_a_module_state_dict_reads_whole(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    loaded = read_state_dict(_saved(tmp_path, module.state_dict()), "head")
    for name, tensor in module.state_dict().items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy())


def test_bad_files_are_one_line_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="head .*missing.pt does not exist"):
        read_state_dict(tmp_path / "missing.pt", "head")
    good = _saved(tmp_path, {"w": torch.randn(64, 64)})
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"head {truncated}") as err:
            read_state_dict(truncated, "head")
        assert "\n" not in str(err.value)
    legacy = _saved(tmp_path, {"w": torch.randn(2)}, name="legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="pre-1.6 format"):
        read_state_dict(legacy, "head")
    with pytest.raises(ValueError, match="not a state dict"):
        read_state_dict(_saved(tmp_path, [torch.randn(2)], name="list.pt"), "head")
    with pytest.raises(ValueError, match="holds no tensors"):
        read_state_dict(_saved(tmp_path, {"epoch": 1}, name="empty.pt"), "head")


def test_code_in_the_pickle_is_refused(tmp_path):
    path = _saved(tmp_path, {"w": torch.randn(2), "counts": collections.Counter("ab")})
    with pytest.raises(ValueError, match=r"collections\.Counter, which is not part of a state dict"):
        read_checkpoint(path, "head")
