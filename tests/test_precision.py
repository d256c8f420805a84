"""Precision and rematerialisation: bf16 compute and remat reach the networks and the
samplers, the frozen teacher is stored in bf16 without changing its output, and bad settings
are named.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scflow_testlib as lib
from scflow_jax import distill, evaluate, precision, sample
from scflow_jax.evaluation import digits_classifier
from scflow_jax.tasks import build_task


def test_precision_and_remat_reach_the_networks(tiny_config):
    task = build_task(tiny_config)
    tiny_config.precision.compute_dtype = "bfloat16"
    tiny_config.model.remat = "dots_saveable"
    configured = precision.configure_task(task, tiny_config)
    assert configured.model.dtype == jnp.bfloat16
    assert configured.discriminator.dtype == jnp.bfloat16
    params = task.init_params(jax.random.PRNGKey(0))
    assert jax.tree.structure(configured.init_params(jax.random.PRNGKey(0))) == jax.tree.structure(
        params
    )
    x = jnp.zeros((2,) + task.image_shape)
    t, cond = jnp.full((2,), 0.5), jnp.asarray(task.cond_table[:2])
    out = configured.velocity_fn(params, t, x, cond)
    assert out.dtype == jnp.float32  # losses stay float32
    jaxpr = str(jax.make_jaxpr(lambda p: configured.velocity_fn(p, t, x, cond))(params))
    assert "remat" in jaxpr and "bf16" in jaxpr
    plain = str(jax.make_jaxpr(lambda p: task.velocity_fn(p, t, x, cond))(params))
    assert "remat" not in plain and "bf16" not in plain


def test_bf16_compute_reaches_the_sample_and_evaluate_samplers(tmp_path, monkeypatch):
    teacher_path = str(tmp_path / "teacher")
    lib.export_perturbed_teacher(teacher_path)
    config = lib.make_config(
        **{
            "precision.compute_dtype": "bfloat16",
            "sample.model": "teacher",
            "distill.teacher_params": teacher_path,
        }
    )
    seen = lib.stop_at_sampler(monkeypatch)
    with pytest.raises(lib.SamplerReached):
        sample.write_samples(config, str(tmp_path / "wd"), ["a handwritten digit one"])
    monkeypatch.setattr(digits_classifier, "load_or_train_classifier", lambda *a, **k: None)
    monkeypatch.setattr(digits_classifier, "reference_statistics", lambda *a, **k: None)
    with pytest.raises(lib.SamplerReached):
        evaluate.evaluate(config, str(tmp_path / "wd"))
    assert seen == [jnp.bfloat16, jnp.bfloat16]


def _teacher_network(family: str):
    """A tiny flow network of each family the distill stage takes as teacher, and inputs for it."""
    from scflow_jax.models import unet_sd
    from scflow_jax.models.small import SmallUNet
    from scflow_jax.models.unet_adm import ADMConfig, ADMUNet

    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 4))
    t = jnp.array([0.3, 0.7])
    if family == "small_unet":
        return SmallUNet(out_channels=4, channels=16, attention_levels=(1,)), (
            x,
            t,
            x.reshape(2, 16, 16),
        )
    if family == "adm":
        return ADMUNet(
            ADMConfig(
                in_channels=4,
                model_channels=16,
                out_channels=4,
                num_res_blocks=1,
                attention_resolutions=(2,),
                channel_mult=(1, 2),
                num_heads=2,
                use_scale_shift_norm=True,
                num_groups=4,
            )
        ), (x, t)
    config = unet_sd.UNetSDConfig.from_dict(
        dict(
            block_out_channels=[16, 32],
            layers_per_block=1,
            cross_attention_dim=8,
            norm_num_groups=8,
            sample_size=8,
            attention_head_dim=4,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        )
    )
    return unet_sd.UNet2DConditionModel(config), (
        x,
        t,
        jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8)),
    )


@pytest.mark.parametrize("family", ["small_unet", "adm", "sd"])
def test_bf16_teacher_storage_changes_no_teacher_output(tiny_config, family):
    model, args = _teacher_network(family)
    params = model.init(jax.random.PRNGKey(0), *args)["params"]
    # Off-default values everywhere (norm scales away from 1, biases away from 0), so that any
    # float32 use of a stored-bf16 leaf would show.
    noise = lambda a, i: a + 0.05 * jax.random.normal(jax.random.PRNGKey(i), a.shape)  # noqa: E731
    leaves, treedef = jax.tree.flatten(params)
    params = jax.tree.unflatten(treedef, [noise(a, i) for i, a in enumerate(leaves)])

    assert (
        precision.frozen_params(params, tiny_config) is params
    )  # float32 compute: stored as it is
    tiny_config.precision.compute_dtype = "bfloat16"
    stored = precision.frozen_params(params, tiny_config)
    dtypes = {(a.ndim >= 2, a.dtype) for a in jax.tree.leaves(stored)}
    assert dtypes == {(True, np.dtype(jnp.bfloat16)), (False, np.dtype(jnp.float32))}
    bf16_model = precision.configure_module(model, dtype=jnp.bfloat16, remat="none")
    apply = jax.jit(lambda p: bf16_model.apply({"params": p}, *args))
    np.testing.assert_array_equal(np.asarray(apply(stored)), np.asarray(apply(params)))
    # Casting every leaf, vectors included, would move the output: the test can tell.
    everything = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    assert not np.array_equal(np.asarray(apply(everything)), np.asarray(apply(params)))


def test_distill_holds_the_frozen_teacher_in_bf16_and_the_student_in_float32():
    config = lib.make_config(
        num_devices=8,
        **{
            "precision.compute_dtype": "bfloat16",
            "mesh.fsdp": 4,
            "mesh.data": 2,
            "mesh.fsdp_min_size": 64,
        },
    )
    task = build_task(config)
    teacher_params = task.init_params(jax.random.PRNGKey(0))
    setup = distill.build_distill(config, workdir="", teacher_params=teacher_params)
    frozen = setup.frozen["teacher_params"]
    for stored, student, original in zip(
        jax.tree.leaves(frozen),
        jax.tree.leaves(setup.state.params),
        jax.tree.leaves(teacher_params),
    ):
        assert student.dtype == jnp.float32
        np.testing.assert_array_equal(
            np.asarray(student), np.asarray(original)
        )  # initialised from float32
        assert stored.dtype == (jnp.bfloat16 if stored.ndim >= 2 else jnp.float32)
        assert stored.sharding.is_equivalent_to(
            student.sharding, stored.ndim
        )  # placed as the student
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(frozen))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("precision.param_dtype", "bfloat16", r"config.precision.param_dtype='bfloat16' is not"),
        ("precision.compute_dtype", "float16", r"config.precision.compute_dtype='float16'"),
        ("model.remat", "sometimes", r"config.model.remat='sometimes'"),
    ],
)
def test_bad_precision_settings_are_named(tiny_config, field, value, match):
    lib.set_field(tiny_config, field, value)
    with pytest.raises(ValueError, match=match):
        precision.validate(tiny_config)
