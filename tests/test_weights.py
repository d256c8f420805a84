"""Tests for scflow_jax.models.weights: the shared checkpoint readers and tree assembly of every
converter."""

import pickle

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as safetensors_numpy
import torch

from scflow_jax.models import weights as W


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.normal(size=(8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(size=(8,)).astype(np.float32),
        "blocks.0.proj.weight": rng.normal(size=(5, 8)).astype(np.float16),
        "blocks.1.norm.weight": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
    }


def test_safetensors_round_trip_matches_reference_library(tmp_path):
    t = {
        k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16
    }  # reference numpy API lacks bf16
    ours = str(tmp_path / "ours.safetensors")
    W.write_safetensors(ours, t, metadata={"format": "pt"})
    loaded_by_reference = safetensors_numpy.load_file(ours)
    theirs = str(tmp_path / "theirs.safetensors")
    safetensors_numpy.save_file(t, theirs)
    loaded_by_us = W.read_safetensors(theirs)
    for k, v in t.items():
        np.testing.assert_array_equal(loaded_by_reference[k], v)
        np.testing.assert_array_equal(loaded_by_us[k], v)
        assert loaded_by_us[k].dtype == v.dtype


def test_bf16_written_by_torch_is_read_exactly(tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(4, 6).to(torch.bfloat16)
    path = str(tmp_path / "bf16.safetensors")
    save_file({"w": x}, path)
    got = W.read_safetensors(path)["w"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupted_safetensors_is_named(tmp_path, damage):
    path = str(tmp_path / "model.safetensors")
    W.write_safetensors(path, _tensors())
    data = open(path, "rb").read()
    if damage == "truncate":
        data = data[:-10]
    elif damage == "garbage_header":
        data = data[:8] + b"{not json" + data[17:]
    else:
        data = b""
    open(path, "wb").write(data)
    with pytest.raises(W.WeightsError, match="model.safetensors"):
        W.read_safetensors(path)


def test_missing_file_and_folder_errors(tmp_path):
    with pytest.raises(W.WeightsError, match="not found"):
        W.read_safetensors(str(tmp_path / "nope.safetensors"))
    with pytest.raises(W.WeightsError, match=r"none of \['a.safetensors'\]"):
        W.find_file(str(tmp_path), ["a.safetensors"], what="UNet")
    with pytest.raises(W.WeightsError, match="config.json not found"):
        W.read_json(str(tmp_path / "config.json"), what="UNet")


def test_torch_state_dict_reader_refuses_pickled_code(tmp_path):
    sd = {"a.weight": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    good = str(tmp_path / "sd.pth")
    torch.save({"ema": sd}, good)
    got = W.read_torch_state_dict(good, subkey="ema")
    np.testing.assert_array_equal(got["a.weight"], np.ones((2, 3), np.float32))
    assert got["b"].dtype == np.float32
    with pytest.raises(W.WeightsError, match="not a tensor"):
        W.read_torch_state_dict(good)  # top level is {"ema": {...}}: needs subkey

    bad = str(tmp_path / "model.pth")
    torch.save(torch.nn.Linear(2, 2), bad)  # a whole pickled module, i.e. code
    with pytest.raises(W.WeightsError, match="not a plain PyTorch state dict"):
        W.read_torch_state_dict(bad)
    garbage = str(tmp_path / "garbage.pth")
    open(garbage, "wb").write(pickle.dumps("hello") + b"junk")
    with pytest.raises(W.WeightsError, match="garbage.pth"):
        W.read_torch_state_dict(garbage)


def test_hf_style_key():
    assert (
        W.hf_style_key(("encoder", "layers_3", "self_attn", "q_proj", "kernel"), ["layers"])
        == "encoder.layers.3.self_attn.q_proj.weight"
    )
    assert W.hf_style_key(("conv_in", "bias")) == "conv_in.bias"
    assert (
        W.hf_style_key(("norm_1", "scale")) == "norm_1.weight"
    )  # not a list module: underscore kept


def _expected():
    return {
        "conv": {
            "kernel": jax.ShapeDtypeStruct((3, 3, 3, 8), np.float32),
            "bias": jax.ShapeDtypeStruct((8,), np.float32),
        },
        "blocks_0": {"proj": {"kernel": jax.ShapeDtypeStruct((8, 5), np.float32)}},
        "blocks_1": {"norm": {"scale": jax.ShapeDtypeStruct((5,), np.float32)}},
    }


def _key(path):
    return W.hf_style_key(path, ["blocks"])


def test_assemble_transposes_and_casts():
    t = _tensors()
    params = W.assemble_params(_expected(), t, _key, what="toy")
    np.testing.assert_array_equal(
        params["conv"]["kernel"], np.transpose(t["conv.weight"], (2, 3, 1, 0))
    )
    np.testing.assert_array_equal(
        params["blocks_0"]["proj"]["kernel"], t["blocks.0.proj.weight"].T.astype(np.float32)
    )
    assert params["blocks_1"]["norm"]["scale"].dtype == np.float32


def test_assemble_reports_every_problem_by_name():
    t = _tensors()
    del t["conv.bias"]
    t["blocks.0.proj.weight"] = np.zeros((5, 7), np.float32)
    t["extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(W.WeightsError) as e:
        W.assemble_params(_expected(), t, _key, what="toy model")
    msg = str(e.value)
    assert "toy model" in msg
    assert "1 missing key(s): conv.bias" in msg
    assert "blocks.0.proj.weight: checkpoint [5, 7]" in msg and "expects [8, 5]" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    # ignore_unused silences only what it names
    with pytest.raises(W.WeightsError) as e:
        W.assemble_params(
            _expected(), t, _key, what="toy", ignore_unused=lambda k: k == "extra.weight"
        )
    assert "unexpected" not in str(e.value)


def test_partial_load_only_when_allowed_and_uses_fallback():
    t = _tensors()
    del t["conv.bias"]
    fallback = jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), _expected())
    params = W.assemble_params(
        _expected(), t, _key, what="toy", allow_partial=True, fallback=fallback
    )
    np.testing.assert_array_equal(params["conv"]["bias"], np.full((8,), 7.0, np.float32))
    with pytest.raises(W.WeightsError, match="fallback"):
        W.assemble_params(_expected(), t, _key, what="toy", allow_partial=True)
