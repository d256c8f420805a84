"""Tests for scflow_jax.models.clip (CLIP text transformer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from scflow_jax.models.clip import CLIPTextConfig, CLIPTextTransformer, encode_text

VOCAB = 50
MAX_POS = 16
SEQ = 10
EOS = VOCAB - 1


def _config(**overrides):
    return CLIPTextConfig.tiny(vocab_size=VOCAB, max_position_embeddings=MAX_POS, **overrides)


def _ids(batch=3, seq=SEQ, eos_positions=(4, 9, 0), seed=0):
    """Random non-eos tokens with the eos token at eos_positions[b] in row b."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, EOS, size=(batch, seq)).astype(np.int32)  # never EOS
    for b, p in enumerate(eos_positions[:batch]):
        ids[b, p] = EOS
    return ids


def _init(config, ids, seed=0, dtype=jnp.float32):
    model = CLIPTextTransformer(config, dtype=dtype)
    variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(ids))
    return model, variables


def _expected_paths(num_layers):
    paths = {
        "embeddings/token_embedding/embedding",
        "embeddings/position_embedding/embedding",
        "final_layer_norm/scale",
        "final_layer_norm/bias",
    }
    for i in range(num_layers):
        pre = f"encoder/layers_{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            paths |= {f"{pre}/self_attn/{proj}/kernel", f"{pre}/self_attn/{proj}/bias"}
        for ln in ("layer_norm1", "layer_norm2"):
            paths |= {f"{pre}/{ln}/scale", f"{pre}/{ln}/bias"}
        for fc in ("fc1", "fc2"):
            paths |= {f"{pre}/mlp/{fc}/kernel", f"{pre}/mlp/{fc}/bias"}
    return paths


def test_shapes_and_param_tree():
    cfg = _config()
    ids = _ids()
    model, variables = _init(cfg, ids)
    hidden, pooled = model.apply(variables, ids)
    assert hidden.shape == (3, SEQ, cfg.hidden_size)
    assert pooled.shape == (3, cfg.hidden_size)
    assert hidden.dtype == jnp.float32 and pooled.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(hidden)))

    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    assert set(flat) == _expected_paths(cfg.num_hidden_layers)
    d, f = cfg.hidden_size, cfg.intermediate_size
    assert flat["embeddings/token_embedding/embedding"].shape == (VOCAB, d)
    assert flat["embeddings/position_embedding/embedding"].shape == (MAX_POS, d)
    assert flat["encoder/layers_0/self_attn/q_proj/kernel"].shape == (d, d)
    assert flat["encoder/layers_1/mlp/fc1/kernel"].shape == (d, f)
    assert flat["encoder/layers_1/mlp/fc2/kernel"].shape == (f, d)
    assert all(v.dtype == jnp.float32 for v in flat.values())
    # Seeded init: same seed -> identical params, std ~0.02 on embeddings.
    _, variables2 = _init(cfg, ids)
    np.testing.assert_array_equal(
        np.asarray(flat["embeddings/token_embedding/embedding"]),
        np.asarray(variables2["params"]["embeddings"]["token_embedding"]["embedding"]),
    )
    std = float(np.std(np.asarray(flat["embeddings/token_embedding/embedding"])))
    assert 0.015 < std < 0.025


def test_sequence_longer_than_max_positions_raises():
    cfg = _config()
    ids = np.zeros((1, MAX_POS + 1), np.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _init(cfg, ids)


def test_causality():
    cfg = _config()
    ids = _ids()
    model, variables = _init(cfg, ids)
    k = 5
    ids2 = ids.copy()
    ids2[:, k] = (ids2[:, k] + 7) % EOS
    h1, _ = model.apply(variables, ids)
    h2, _ = model.apply(variables, ids2)
    h1, h2 = np.asarray(h1), np.asarray(h2)
    np.testing.assert_allclose(h2[:, :k], h1[:, :k], atol=1e-6, rtol=0)
    assert np.all(np.max(np.abs(h2[:, k] - h1[:, k]), axis=-1) > 1e-3)
    assert np.all(np.max(np.abs(h2[:, k + 1 :] - h1[:, k + 1 :]), axis=-1) > 1e-5)


def test_pooled_is_first_eos():
    cfg = _config()
    eos_positions = (4, 9, 0)
    ids = _ids(eos_positions=eos_positions)
    ids[0, 6:] = EOS  # padded with eos after the first one: the first must be used
    model, variables = _init(cfg, ids)
    hidden, pooled = model.apply(variables, ids)
    hidden, pooled = np.asarray(hidden), np.asarray(pooled)
    for b, p in enumerate(eos_positions):
        np.testing.assert_array_equal(pooled[b], hidden[b, p])
    # Not trivially some fixed position.
    assert not np.allclose(pooled[0], hidden[0, 6])
    assert not np.allclose(pooled[0], hidden[0, -1])


def test_pooled_legacy_rule_eos_token_id_2():
    cfg = _config(eos_token_id=2)
    ids = _ids()  # EOS (the largest id) sits at positions 4, 9, 0; token 2 may appear anywhere
    ids[ids == 2] = 3
    ids[1, 2] = 2
    model, variables = _init(cfg, ids)
    hidden, pooled = model.apply(variables, ids)
    hidden, pooled = np.asarray(hidden), np.asarray(pooled)
    for b in range(ids.shape[0]):
        np.testing.assert_array_equal(pooled[b], hidden[b, int(np.argmax(ids[b]))])


def test_padding_mask():
    cfg = _config()
    eos_positions = (4, 9, 2)
    ids = _ids(eos_positions=eos_positions)
    model, variables = _init(cfg, ids)
    mask = (np.arange(SEQ)[None, :] <= np.asarray(eos_positions)[:, None]).astype(np.int32)
    h_nomask, p_nomask = model.apply(variables, ids)
    h_mask, p_mask = model.apply(variables, ids, mask)
    h_nomask, h_mask = np.asarray(h_nomask), np.asarray(h_mask)
    assert np.all(np.isfinite(h_mask))
    for b, p in enumerate(eos_positions):
        np.testing.assert_allclose(h_mask[b, : p + 1], h_nomask[b, : p + 1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(p_mask), np.asarray(p_nomask), atol=1e-6, rtol=0)

    # Masking an earlier key changes later outputs but not earlier ones.
    mask2 = np.ones((3, SEQ), np.int32)
    mask2[:, 2] = 0
    h_mask2, _ = model.apply(variables, ids, mask2)
    h_mask2 = np.asarray(h_mask2)
    np.testing.assert_allclose(h_mask2[:, :2], h_nomask[:, :2], atol=1e-6, rtol=0)
    assert np.all(np.max(np.abs(h_mask2[:, 3:] - h_nomask[:, 3:]), axis=-1) > 1e-5)


def test_from_dict():
    hf_clip = {
        "architectures": ["CLIPModel"],
        "projection_dim": 768,
        "logit_scale_init_value": 2.6592,
        "torch_dtype": "float32",
        "text_config": {
            "vocab_size": 1000,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "eos_token_id": 999,
            "bos_token_id": 998,
            "dropout": 0.0,
            "model_type": "clip_text_model",
        },
        "vision_config": {"hidden_size": 1024, "patch_size": 14},
    }
    cfg = CLIPTextConfig.from_dict(hf_clip)
    assert cfg == CLIPTextConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        eos_token_id=999,
    )
    # Flat text-model config (e.g. SD's text_encoder/config.json); missing keys keep defaults.
    flat = {
        "architectures": ["CLIPTextModel"],
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "eos_token_id": 2,
        "unknown_key": 1,
        "projection_dim": 512,
    }
    cfg2 = CLIPTextConfig.from_dict(flat)
    assert cfg2.hidden_size == 1024 and cfg2.num_attention_heads == 16 and cfg2.eos_token_id == 2
    assert (
        cfg2.vocab_size == 49408
        and cfg2.num_hidden_layers == 12
        and cfg2.hidden_act == "quick_gelu"
    )
    # Defaults are CLIP ViT-L/14's text encoder.
    assert CLIPTextConfig.from_dict({}) == CLIPTextConfig()
    assert dataclasses.astuple(CLIPTextConfig())[:6] == (49408, 768, 3072, 12, 12, 77)
    with pytest.raises(ValueError):
        CLIPTextConfig(hidden_act="swish")


def test_activation_switch_is_wired():
    ids = _ids()
    outs = {}
    variables = None
    for act in ("quick_gelu", "gelu", "gelu_new"):
        cfg = _config(hidden_act=act)
        model = CLIPTextTransformer(cfg)
        if variables is None:
            variables = model.init(jax.random.PRNGKey(0), ids)
        outs[act] = np.asarray(model.apply(variables, ids)[0])
    assert np.max(np.abs(outs["quick_gelu"] - outs["gelu"])) > 1e-4
    assert np.max(np.abs(outs["gelu"] - outs["gelu_new"])) > 1e-7
    assert np.max(np.abs(outs["quick_gelu"] - outs["gelu_new"])) > 1e-4


def test_encode_text_and_bf16():
    cfg = _config()
    ids = _ids()
    model, variables = _init(cfg, ids)
    ref, _ = model.apply(variables, ids)
    out = encode_text(variables, cfg, ids)
    assert out.dtype == jnp.float32 and out.shape == (3, SEQ, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    out_bare = encode_text(variables["params"], cfg, ids)  # bare parameter tree accepted
    np.testing.assert_allclose(np.asarray(out_bare), np.asarray(ref), atol=1e-5, rtol=1e-5)

    h16, p16 = CLIPTextTransformer(cfg, dtype=jnp.bfloat16).apply(variables, ids)
    assert h16.dtype == jnp.bfloat16 and p16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(h16, np.float32), np.asarray(ref), atol=0.1, rtol=0)
    out16 = encode_text(variables, cfg, ids, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.float32


def _np_reference(params, cfg, ids, attention_mask=None):
    """Independent NumPy forward pass (float64) of the CLIP text transformer."""
    p = traverse_util.flatten_dict(params, sep="/")
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * p[f"{name}/scale"] + p[f"{name}/bias"]

    def dense(x, name):
        return x @ p[f"{name}/kernel"] + p[f"{name}/bias"]

    from scipy.special import erf

    acts = {
        "quick_gelu": lambda x: x / (1.0 + np.exp(-1.702 * x)),
        "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
        "gelu_new": lambda x: (
            0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
        ),
    }
    b, seq_len = ids.shape
    h, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    x = (
        p["embeddings/token_embedding/embedding"][ids]
        + p["embeddings/position_embedding/embedding"][:seq_len]
    )
    allowed = np.tril(np.ones((seq_len, seq_len), bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, None, :]
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder/layers_{i}"
        y = ln(x, f"{pre}/layer_norm1")
        q, k, v = (
            dense(y, f"{pre}/self_attn/{n}").reshape(b, seq_len, h, hd).transpose(0, 2, 1, 3)
            for n in ("q_proj", "k_proj", "v_proj")
        )
        s = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + dense(a.transpose(0, 2, 1, 3).reshape(b, seq_len, -1), f"{pre}/self_attn/out_proj")
        y = ln(x, f"{pre}/layer_norm2")
        x = x + dense(acts[cfg.hidden_act](dense(y, f"{pre}/mlp/fc1")), f"{pre}/mlp/fc2")
    x = ln(x, "final_layer_norm")
    eos = np.argmax(ids == cfg.eos_token_id, axis=-1)
    return x, x[np.arange(b), eos]


@pytest.mark.parametrize("act", ["quick_gelu", "gelu", "gelu_new"])
def test_matches_numpy_reference(act):
    cfg = _config(hidden_act=act)
    eos_positions = (4, 9, 2)
    ids = _ids(eos_positions=eos_positions, seed=1)
    model, variables = _init(cfg, ids, seed=3)
    # Randomise LayerNorm params and biases (init makes them 1 / 0) so every parameter matters.
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    keys = jax.random.split(jax.random.PRNGKey(7), len(flat))
    flat = {
        k: v + 0.1 * jax.random.normal(kk, v.shape)
        for kk, (k, v) in zip(keys, sorted(flat.items()))
    }
    params = traverse_util.unflatten_dict(flat, sep="/")
    mask = np.ones((3, SEQ), np.int32)
    mask[0, 1] = 0
    mask[1, 7:] = 0
    for attention_mask in (None, mask):
        hidden, pooled = model.apply({"params": params}, ids, attention_mask)
        ref_h, ref_p = _np_reference(params, cfg, ids, attention_mask)
        np.testing.assert_allclose(np.asarray(hidden), ref_h, atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(pooled), ref_p, atol=1e-4, rtol=0)


class _FakeTensor:
    """Stands in for a torch tensor in the name-mapping test (only what _hf_to_flax uses)."""

    def __init__(self, array):
        self._array = np.asarray(array)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self._array


@pytest.mark.parametrize("prefix", ["", "text_model."])
def test_hf_name_mapping_roundtrip(prefix):
    """The mechanical HF -> Flax renaming used by the parity test covers the whole tree (no torch
    needed)."""
    cfg = _config()
    _, variables = _init(cfg, _ids())
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    state_dict = {f"{prefix}embeddings.position_ids": _FakeTensor(np.arange(MAX_POS)[None])}
    for path, value in flat.items():
        parts = path.split("/")
        if parts[0] == "encoder":
            parts = ["encoder", "layers", parts[1].split("_")[1]] + parts[2:]
        value = np.asarray(value)
        if parts[-1] == "kernel":
            parts[-1], value = "weight", value.T
        elif parts[-1] in ("scale", "embedding"):
            parts[-1] = "weight"
        state_dict[prefix + ".".join(parts)] = _FakeTensor(value)
    assert "encoder.layers.1.self_attn.out_proj.weight" in {k[len(prefix) :] for k in state_dict}
    mapped = traverse_util.flatten_dict(_hf_to_flax(state_dict, cfg.num_hidden_layers), sep="/")
    assert set(mapped) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(mapped[k], np.asarray(flat[k]))


def _hf_to_flax(state_dict, num_layers):
    """Maps an HF CLIPTextModel state dict onto our parameter tree (test-local converter)."""
    params = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue  # buffer, not a parameter
        if key.startswith("text_model."):  # transformers < 5 nests the modules under text_model
            key = key[len("text_model.") :]
        parts = key.split(".")
        if parts[0] == "encoder":
            assert parts[1] == "layers"
            parts = ["encoder", f"layers_{parts[2]}"] + parts[3:]
        value = tensor.detach().cpu().numpy().astype(np.float32)
        leaf = parts[-1]
        module = parts[-2]
        if module in ("token_embedding", "position_embedding"):
            assert leaf == "weight"
            parts[-1] = "embedding"
        elif module.startswith("layer_norm") or module == "final_layer_norm":
            parts[-1] = "scale" if leaf == "weight" else "bias"
        elif leaf == "weight":  # Linear: torch [out, in] -> flax kernel [in, out]
            parts[-1] = "kernel"
            value = value.T
        params["/".join(parts)] = value
    assert set(params) == _expected_paths(num_layers)
    return traverse_util.unflatten_dict(params, sep="/")


@pytest.mark.parity
def test_parity_with_hf_transformers():
    try:
        import torch
    except ImportError:
        pytest.skip("parity test needs PyTorch (pip install -e .[parity]); torch is not importable")
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    hf_cfg = HFConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_POS,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        eos_token_id=EOS,
        bos_token_id=EOS - 1,
        pad_token_id=0,
    )
    hf = CLIPTextModel(hf_cfg).eval()
    with (
        torch.no_grad()
    ):  # HF zero-inits biases and unit-inits LayerNorms; perturb so the mapping is tested
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))

    cfg = CLIPTextConfig.from_dict(hf_cfg.to_dict())
    assert cfg == _config()
    params = _hf_to_flax(hf.state_dict(), cfg.num_hidden_layers)

    eos_positions = (4, 9, 2)
    ids = _ids(eos_positions=eos_positions)
    mask = (np.arange(SEQ)[None, :] <= np.asarray(eos_positions)[:, None]).astype(np.int32)
    model = CLIPTextTransformer(cfg)
    for attention_mask in (None, mask):
        with torch.no_grad():
            out = hf(
                input_ids=torch.from_numpy(ids).long(),
                attention_mask=None
                if attention_mask is None
                else torch.from_numpy(attention_mask).long(),
            )
        hidden, pooled = model.apply({"params": params}, ids, attention_mask)
        hf_hidden = out.last_hidden_state.numpy()
        hf_pooled = out.pooler_output.numpy()
        assert np.max(np.abs(np.asarray(hidden) - hf_hidden)) <= 1e-4
        assert np.max(np.abs(np.asarray(pooled) - hf_pooled)) <= 1e-4
