"""Scale-out: mesh shapes, FSDP rules, multi-process runs, precision, launch scripts.

The two-process test starts two real JAX processes on localhost (CPU collectives through
gloo), each with 2 fake devices, on a (data=2, fsdp=2) mesh, and checks that they reach the
same losses and parameters as one process with 4 devices and pure data parallelism.
Tolerances: 1e-5 on losses and metrics (reductions run in a different order on different
meshes), 1e-4 on parameters after several Adam steps. A second two-process test runs the
sample stage and the evaluation sampler: the same images as one process (1e-6), gathered
to both processes, files written by process 0 only.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

import scflow_testlib as lib
from scflow_jax import (
    checkpoint,
    distill,
    distributed,
    evaluate,
    layout,
    precision,
    sample,
    sharding,
    teacher,
    train_state,
    trainer,
)
from scflow_jax.data.pipeline import InMemoryBatches
from scflow_jax.evaluation import digits_classifier, digits_eval
from scflow_jax.losses import flow_matching
from scflow_jax.tasks import build_task

REPO = lib.REPO_ROOT
TOL = dict(rtol=1e-5, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- mesh shapes
@pytest.mark.parametrize(
    "data,fsdp,expected",
    [
        (-1, 1, (8, 1)),
        (-1, 4, (2, 4)),
        (2, -1, (2, 4)),
        (8, 1, (8, 1)),
        (1, 8, (1, 8)),
    ],
)
def test_mesh_shape_fills_one_axis(data, fsdp, expected):
    mesh = sharding.make_mesh(data, -1, fsdp)
    assert (mesh.shape[sharding.DATA_AXIS], mesh.shape[sharding.FSDP_AXIS]) == expected


@pytest.mark.parametrize(
    "data,fsdp,match",
    [
        (2, 2, r"config.mesh.data=2 x config.mesh.fsdp=2 = 4 does not match the 8 devices"),
        (-1, 3, r"config.mesh.fsdp=3 does not divide the 8 devices"),
        (-1, -1, r"config.mesh.data and config.mesh.fsdp are both -1"),
        (0, 1, r"config.mesh.data=0 must be a positive size or -1"),
    ],
)
def test_mesh_shape_not_matching_devices_is_named(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(data, -1, fsdp)


def test_global_batch_must_divide_over_the_mesh():
    mesh = sharding.make_mesh(-1, -1, 4)
    with pytest.raises(
        ValueError,
        match=r"config.distill.batch_size=12 is not divisible by "
        r"the number of devices in the mesh \(8 = "
        r"config.mesh.data 2 x config.mesh.fsdp 4\)",
    ):
        sharding.check_global_batch(12, mesh, "config.distill.batch_size")


# ------------------------------------------------------------------------- FSDP rules
def test_fsdp_rule_shards_the_largest_divisible_axis():
    rules = sharding.ShardingRules(fsdp_min_size=64)
    assert sharding.fsdp_spec((3, 3, 16, 32), 4, rules) == P(None, None, None, "fsdp")
    assert sharding.fsdp_spec((64, 6), 4, rules) == P("fsdp")  # 6 is not divisible
    assert sharding.fsdp_spec((8, 8), 4, rules) == P(None, "fsdp")  # tie: the later axis
    assert sharding.fsdp_spec((32,), 4, rules) == P()  # below fsdp_min_size
    assert sharding.fsdp_spec((3, 3, 16, 32), 1, rules) == P()  # no fsdp axis
    assert sharding.fsdp_spec((5, 7, 3), 4, rules) is None  # large, unsplittable


def test_unsplittable_parameter_is_replicated_or_named_when_strict():
    mesh = sharding.make_mesh(1, -1, 8)
    tree = {
        "dense": {"kernel": jax.ShapeDtypeStruct((48, 64), jnp.float32)},
        "odd": {"kernel": jax.ShapeDtypeStruct((3, 5, 7, 9), jnp.float32)},
        "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
    }
    summary = sharding.ShardingSummary()
    out = sharding.state_shardings(tree, mesh, sharding.ShardingRules(fsdp_min_size=500), summary)
    assert out["dense"]["kernel"].spec == P(None, "fsdp")
    assert out["odd"]["kernel"].spec == P() and out["bias"].spec == P()
    assert (summary.sharded_leaves, summary.replicated_leaves) == (1, 2)
    assert summary.sharded_bytes == 48 * 64 * 4
    assert summary.replicated_bytes == (3 * 5 * 7 * 9 + 64) * 4
    assert "odd/kernel (3, 5, 7, 9)" in summary.describe()
    with pytest.raises(
        sharding.UnshardableParameterError,
        match=r"parameter 'odd/kernel' of shape \(3, 5, 7, 9\) has no dimension "
        r"divisible by config.mesh.fsdp=8",
    ):
        sharding.state_shardings(tree, mesh, sharding.ShardingRules(500, strict=True))


def _teacher_setup(config, mesh):
    task, optimizer, root_key, init_fn = lib.teacher_init(config)
    state, abstract, shardings = trainer.init_state(
        init_fn, mesh, sharding.ShardingRules.from_config(config)
    )
    return task, optimizer, root_key, state, abstract, shardings


def _run_teacher(config, num_steps=2):
    mesh = sharding.mesh_from_config(config)
    task, optimizer, root_key, state, _, shardings = _teacher_setup(config, mesh)
    step = teacher.make_train_step(task, config.teacher, optimizer, mesh, root_key, shardings)
    bs = config.teacher.batch_size
    data = InMemoryBatches(
        {k: task.train[k] for k in ("image", "cond")},
        bs,
        seed=0,
        process_rows=sharding.process_batch_indices(mesh, bs),
    )
    metrics = []
    for s in range(num_steps):
        state, m = step(state, sharding.shard_batch(data.batch(s), mesh))
        metrics.append(lib.to_host(m))
    return metrics, state, shardings


def test_fsdp_step_matches_data_parallel_and_shards_like_params():
    base = dict(num_devices=8, mesh__fsdp_min_size=256)
    dp_metrics, dp_state, _ = _run_teacher(lib.make_config(**base, mesh__fsdp=1))
    fs_metrics, fs_state, fs_shardings = _run_teacher(lib.make_config(**base, mesh__fsdp=4))
    for a, b in zip(dp_metrics, fs_metrics):
        lib.assert_trees_close(a, b, what="metrics", **TOL)
    lib.assert_trees_close(lib.to_host(dp_state), lib.to_host(fs_state), what="state", **TOL)

    specs = jax.tree.map(lambda x: x.sharding.spec, fs_state.params)
    assert any(
        "fsdp" in tuple(s) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    )
    # The EMA and the Adam moments are laid out exactly like their parameters, in the step's
    # output as well as in the initial state.
    adam = fs_state.opt_state[1][0]
    for tree in (fs_state.ema_params, adam.mu, adam.nu, fs_shardings.params):
        assert jax.tree.map(lambda x: getattr(x, "sharding", x).spec, tree) == specs


# --------------------------------------------------------------- checkpoints across meshes
def test_checkpoint_written_under_one_mesh_restores_under_another(tmp_path):
    config_dp = lib.make_config(num_devices=8, mesh__fsdp=1)
    config_fsdp = lib.make_config(
        num_devices=8, mesh__data=2, mesh__fsdp=-1, mesh__fsdp_min_size=256
    )
    mesh_dp = sharding.mesh_from_config(config_dp)
    *_, state, abstract, _ = _teacher_setup(config_dp, mesh_dp)
    state = state.replace(params=jax.tree.map(lambda x: x + 0.5, state.params))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"))
    try:
        ckpt.save(1, state, force=True)
        ckpt.wait()
        mesh_fsdp = sharding.mesh_from_config(config_fsdp)
        shardings = sharding.state_shardings(
            abstract, mesh_fsdp, sharding.ShardingRules.from_config(config_fsdp)
        )
        restored = ckpt.restore(abstract, shardings, 1)
    finally:
        ckpt.close()
    lib.assert_trees_equal(lib.to_host(state), lib.to_host(restored), "restored state")
    got = jax.tree.leaves(jax.tree.map(lambda x: x.sharding, restored))
    assert got == jax.tree.leaves(shardings)
    assert any(s.spec != P() for s in got)


# ---------------------------------------------------------------------- batches
def test_process_rows_cover_the_global_batch_in_one_process():
    mesh = sharding.make_mesh(2, -1, 4)
    np.testing.assert_array_equal(sharding.process_batch_indices(mesh, 16), np.arange(16))
    x = sharding.shard_batch({"x": np.arange(16.0)}, mesh)["x"]
    assert x.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(sharding.to_host(x), np.arange(16.0))


def test_host_batch_every_process_holds_is_split_into_each_devices_rows():
    mesh = sharding.make_mesh(2, -1, 4)
    batch = {"x": np.arange(16.0), "c": np.arange(32).reshape(16, 2), "none": None}
    out = sharding.shard_global_batch(batch, mesh)
    assert out["none"] is None
    for name in ("x", "c"):
        assert out[name].sharding == sharding.batch_sharding(mesh)
        for shard in out[name].addressable_shards:  # a device holds exactly its own rows
            np.testing.assert_array_equal(np.asarray(shard.data), batch[name][shard.index])
        np.testing.assert_array_equal(sharding.to_host(out[name]), batch[name])
    # The same arrays as a loader that reads only this process's rows.
    rows = sharding.process_batch_indices(mesh, 16)
    loaded = sharding.shard_batch({"x": batch["x"][rows]}, mesh)["x"]
    assert loaded.sharding == out["x"].sharding
    np.testing.assert_array_equal(sharding.to_host(loaded), sharding.to_host(out["x"]))

    with pytest.raises(
        ValueError,
        match=r"a global batch of shape \(12,\) does not split over "
        r"the 8 devices of the mesh \(pad it with pad_batch\)",
    ):
        sharding.shard_global_batch({"x": np.arange(12.0)}, mesh)


def test_pad_batch_repeats_the_last_row_up_to_the_device_multiple():
    mesh = sharding.make_mesh(-1, 8)
    assert [sharding.padded_size(n, mesh) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    padded = sharding.pad_batch({"x": np.arange(9), "c": np.arange(18).reshape(9, 2)}, 16)
    np.testing.assert_array_equal(padded["x"], list(range(9)) + [8] * 7)
    np.testing.assert_array_equal(padded["c"][9:], np.repeat([[16, 17]], 7, axis=0))
    assert sharding.pad_batch({"x": np.arange(8)}, 8)["x"].tolist() == list(range(8))
    with pytest.raises(ValueError, match="cannot pad a batch of 9 rows to 8 rows"):
        sharding.pad_batch({"x": np.arange(9)}, 8)


@pytest.mark.parametrize(
    "rows,match",
    [
        ([0, 4], r"process_rows holds rows outside the global batch of 4: \[4\]"),
        ([1, 1], r"process_rows repeats rows: \[1, 1\]"),
        ([], r"process_rows must be a non-empty 1-D array of row indices"),
        ([[0, 1]], r"process_rows must be a non-empty 1-D array of row indices"),
    ],
)
def test_bad_process_rows_are_named(rows, match):
    with pytest.raises(ValueError, match=match):
        InMemoryBatches({"x": np.arange(8)}, 4, seed=0, process_rows=rows)


def test_sample_stage_gives_the_same_images_on_1_and_8_devices(tmp_path):
    """9 samples: one device computes them as one batch, 8 devices as 16 rows (the last one
    repeated), each device its own 2; the PNGs must not change."""
    prompts = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two"]
    teacher_path = str(tmp_path / "teacher")
    _teacher_export(teacher_path)
    pngs = {}
    for devices in (1, 8):
        config = lib.make_config(
            num_devices=devices,
            **{
                "sample.model": "teacher",
                "sample.num_per_prompt": 3,
                "distill.teacher_params": teacher_path,
            },
        )
        (out,) = sample.write_samples(config, str(tmp_path / f"wd{devices}"), prompts)
        pngs[devices] = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    assert len(pngs[1]) == 9 + 2 and pngs[1] == pngs[8]


# ----------------------------------------------------------------- gradient accumulation
def test_teacher_grad_accumulation_averages_strided_microbatches():
    config = lib.make_config(num_devices=8, teacher__grad_accum_steps=2, teacher__batch_size=16)
    mesh = sharding.mesh_from_config(config)
    task, optimizer, root_key, state, _, shardings = _teacher_setup(config, mesh)
    params = lib.to_host(state.params)
    batch = {k: task.train[k][:16] for k in ("image", "cond")}
    step = teacher.make_train_step(task, config.teacher, optimizer, mesh, root_key, shardings)
    _, metrics = step(state, sharding.shard_batch(batch, mesh))

    # Reference: microbatch j = rows j, j+2, ... with key fold_in(step key, j), averaged.
    rng = jax.random.fold_in(root_key, 0)
    loss_and_grad = jax.jit(
        lambda p, z0, cond, key: jax.value_and_grad(flow_matching.flow_matching_loss, has_aux=True)(
            p,
            task.velocity_fn,
            z0,
            cond,
            key,
            null_cond=jnp.asarray(task.null_cond),
            cond_drop_prob=config.teacher.cond_drop_prob,
        )
    )
    losses, grads = [], []
    for j in range(2):
        (loss, _), g = loss_and_grad(
            params, batch["image"][j::2], batch["cond"][j::2], jax.random.fold_in(rng, j)
        )
        losses.append(loss)
        grads.append(g)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    np.testing.assert_allclose(float(metrics["loss_fm"]), float(np.mean(losses)), **TOL)
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), float(train_state.global_norm(mean_grad)), **TOL
    )


def test_grad_accumulation_errors_are_named():
    mesh = sharding.make_mesh(-1, -1, 1)
    config = lib.make_config(num_devices=8, teacher__grad_accum_steps=3, teacher__batch_size=16)
    with pytest.raises(
        ValueError,
        match=r"config.teacher.batch_size=16 must split into "
        r"config.teacher.grad_accum_steps=3 microbatches",
    ):
        teacher.check_grad_accum(config.teacher, mesh)
    config = lib.make_config(distill__grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"config.distill.grad_accum_steps=2 is not supported"):
        distill.validate_distill_config(config)


# ------------------------------------------------------------------------- precision
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
    _teacher_export(teacher_path)
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
    # Off-default values everywhere (norm scales away from 1, biases away from 0), so that any float32 use
    # of a stored-bf16 leaf would show.
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


# ------------------------------------------------------------------- distributed start-up
def test_process_id_out_of_range_is_named(tiny_config):
    tiny_config.distributed.update(num_processes=2, process_id=2)
    with pytest.raises(
        ValueError,
        match=r"config.distributed.process_id=2 must lie in "
        r"\[0, config.distributed.num_processes=2\)",
    ):
        distributed.initialize(tiny_config.distributed)


def _cli_multihost(tmp_path, process_id: int, port: int, timeout_s: int):
    cmd = lib.cli_command(
        str(tmp_path / "wd"),
        "distill",
        "--config=configs/default.py:tiny",
        "--multihost",
        f"--config.distributed.coordinator_address=localhost:{port}",
        "--config.distributed.num_processes=2",
        f"--config.distributed.process_id={process_id}",
        f"--config.distributed.initialization_timeout={timeout_s}",
    )
    return subprocess.run(
        cmd, cwd=REPO, env=lib.subprocess_env(), capture_output=True, text=True, timeout=120
    )


def test_unreachable_coordinator_fails_with_a_clear_message(tmp_path):
    proc = _cli_multihost(tmp_path, process_id=1, port=free_port(), timeout_s=3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did not accept connections within 3 s" in proc.stderr, proc.stderr[-2000:]
    assert "config.distributed.coordinator_address" in proc.stderr


def test_missing_processes_fail_with_a_clear_message(tmp_path):
    # Process 0 of 2 starts alone: the cluster never completes.
    proc = _cli_multihost(tmp_path, process_id=0, port=free_port(), timeout_s=3)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "did not form within 3 s" in proc.stderr, proc.stderr[-2000:]
    assert "not all of the 2 processes (config.distributed.num_processes)" in proc.stderr


# ------------------------------------------------------------------- two real processes
OVERRIDES = {
    "distill.num_steps": 3,
    "distill.checkpoint_every": 2,
    "distill.log_every": 1,
    "distill.sample_every": 0,
    "mesh.fsdp_min_size": 256,
}


def _teacher_export(path: str) -> None:
    from scflow_jax.default_config import get_config

    task = build_task(get_config("tiny"))
    params = task.init_params(jax.random.PRNGKey(5))
    # Perturbed so the zero-initialised output layers do not make every term trivial.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    checkpoint.save_params(path, params)


def _reference_run(config, workdir):
    recorded = []
    build = distill.build_distill

    def recording_build(*args, **kwargs):
        import dataclasses

        setup = build(*args, **kwargs)
        step = setup.train_step

        def recording_step(state, batch):
            state, metrics = step(state, batch)
            recorded.append({k: float(v) for k, v in lib.to_host(metrics).items()})
            return state, metrics

        return dataclasses.replace(setup, train_step=recording_step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "build_distill", recording_build)
        distill.distill(config, workdir)
    return recorded


def _start_workers(tmp_path, job: str, overrides: dict, **spec_fields) -> list:
    """Two tests/multihost_worker.py processes running ``job``, each with 2 CPU devices, on
    a (data=2, fsdp=2) mesh; returns (process, result file) pairs."""
    port = free_port()
    env = lib.subprocess_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"
    )
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for i in range(2):
        out = str(tmp_path / f"out{i}.json")
        spec = {
            "process_id": i,
            "num_processes": 2,
            "port": port,
            "out": out,
            "job": job,
            "workdir": str(tmp_path / "multi"),
            **spec_fields,
            "overrides": {
                **lib.OVERRIDES,
                **overrides,
                "mesh.num_devices": -1,
                "mesh.data": 2,
                "mesh.fsdp": 2,
            },
        }
        spec_path = tmp_path / f"spec{i}.json"
        spec_path.write_text(json.dumps(spec))
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(REPO, "tests", "multihost_worker.py"),
                        str(spec_path),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
                out,
            )
        )
    return procs


def _finish_workers(procs) -> list[dict]:
    """Waits for the workers; their result files, in process order."""
    logs = []
    for p, _ in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    for (p, _), log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    results = [json.load(open(out)) for _, out in procs]
    assert [r["process_index"] for r in results] == [0, 1]
    assert all(r["process_count"] == 2 and r["device_count"] == 4 for r in results)
    return results


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_match_one_process(tmp_path):
    teacher_path = str(tmp_path / "teacher_params")
    _teacher_export(teacher_path)
    overrides = {**OVERRIDES, "distill.teacher_params": teacher_path}

    # Two processes x 2 devices, FSDP inside each process, data parallel across them.
    procs = _start_workers(tmp_path, "distill", overrides)

    # Meanwhile: one process, 4 devices, pure data parallelism, the same global batch.
    config = lib.make_config(num_devices=4)
    for k, v in overrides.items():
        lib.set_field(config, k, v)
    reference = _reference_run(config, str(tmp_path / "single"))

    results = _finish_workers(procs)

    assert len(reference) == 3
    for r in results:
        assert len(r["metrics"]) == 3
        for step, (got, want) in enumerate(zip(r["metrics"], reference)):
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_allclose(got[k], want[k], err_msg=f"step {step + 1} {k}", **TOL)
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"], rel=1e-7)

    # Exported students agree; checkpoints were written collectively; one TensorBoard file.
    abstract = lib.abstract_params(build_task(config))
    mesh = sharding.make_mesh(-1, 1)
    load = lambda wd: lib.to_host(
        checkpoint.load_params(  # noqa: E731
            layout.student_params_path(wd),
            abstract,
            sharding.state_shardings(abstract, mesh),
            what=wd,
        )
    )
    # Parameters get 1e-4: Adam divides by sqrt(v), which amplifies the rounding differences
    # of near-zero gradients (the losses above agree to 1e-5).
    lib.assert_trees_close(
        load(str(tmp_path / "multi")),
        load(str(tmp_path / "single")),
        what="exported student",
        rtol=1e-4,
        atol=1e-4,
    )
    multi = layout.stage_dirs(str(tmp_path / "multi"), layout.DISTILL)
    assert checkpoint.Checkpointer(multi.checkpoints).all_steps() == [2, 3]
    assert len(glob.glob(os.path.join(multi.tensorboard, "events.out.tfevents.*"))) == 1


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_sample_and_generate_like_one_process(tmp_path):
    """The sample stage and the evaluation sampler in two processes (each feeding its own rows
    of host batches every process holds, results gathered to both, files written by process
    0 only) give the images of one process with 4 devices."""
    teacher_path = str(tmp_path / "teacher_params")
    _teacher_export(teacher_path)
    prompts = ["a handwritten digit one", "a handwritten digit seven", "a handwritten digit two"]
    # 3 prompts x 3 = 9 samples, padded to 12 for 4 devices; 12 evaluation samples in
    # batches of 8 leave a ragged last batch.
    overrides = {
        "distill.teacher_params": teacher_path,
        "sample.model": "teacher",
        "sample.num_per_prompt": 3,
        "eval.batch_size": 8,
    }
    num_samples = 12
    procs = _start_workers(
        tmp_path, "generate", overrides, prompts=prompts, num_samples=num_samples
    )

    config = lib.make_config(num_devices=4)
    for k, v in overrides.items():
        lib.set_field(config, k, v)
    (single_dir,) = sample.write_samples(config, str(tmp_path / "single"), prompts)
    task = build_task(config)
    mesh = sharding.mesh_from_config(config)
    want = digits_eval.generate(
        task,
        task.load_flow_params(teacher_path, mesh, "teacher"),
        digits_eval.per_sample_noise(config.seed, num_samples, task.image_shape),
        digits_eval.prompted_labels(num_samples),
        num_steps=2,
        guidance=1.5,
        batch_size=8,
        mesh=mesh,
    )

    results = _finish_workers(procs)
    for r, (_, out) in zip(results, procs):
        got = np.load(out + ".npy")  # every process holds every sample
        assert got.shape == want.shape == (num_samples,) + task.image_shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Each process computed its rows of one global batch (not a copy of the whole batch):
    # sample: 9 rows padded to 12; evaluation: two batches of 8.
    shape = list(task.image_shape)
    assert (
        results[0]["gathers"] == results[1]["gathers"] == [[12] + shape, [8] + shape, [8] + shape]
    )
    multi_dir = results[0]["out_dir"]
    names = sorted(os.listdir(single_dir))
    assert sorted(os.listdir(multi_dir)) == names and len(names) == 9 + 2  # + grid, prompts
    assert sorted(os.path.basename(p) for p in results[0]["written"]) == sorted(
        n for n in names if n.endswith(".png")
    )
    assert results[1]["written"] == []  # process 1 writes no file
    for name in names:
        if name.endswith(".png"):
            a, b = (
                np.asarray(Image.open(os.path.join(d, name)), np.int32)
                for d in (single_dir, multi_dir)
            )
            assert np.abs(a - b).max() <= 1, name  # float rounding may move one uint8 level


# ------------------------------------------------------------------------ launch scripts
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = [
    "tpu_create.sh",
    "tpu_setup.sh",
    "tpu_inputs.sh",
    "tpu_run.sh",
    "tpu_logs.sh",
    "tpu_delete.sh",
    "slurm_gpu.sbatch",
    "common.sh",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_launch_script_parses(name):
    path = os.path.join(LAUNCH, name)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    if name != "common.sh":
        assert "set -euo pipefail" in text and "Usage:" in text
    if shutil.which("shellcheck"):
        proc = subprocess.run(
            ["shellcheck", "-x", "-S", "warning", path], cwd=LAUNCH, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s.startswith("tpu_")])
def test_tpu_scripts_print_usage(name):
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, name), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PROJECT": "p"},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr


def test_tpu_run_requires_a_bucket_workdir():
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_run.sh"), "--workdir", "/tmp/x"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PROJECT": "p"},
    )
    assert proc.returncode != 0 and "gs://" in proc.stderr


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s.startswith("tpu_")])
@pytest.mark.parametrize("flag", ["--name", "--zone", "--project"])
def test_tpu_scripts_name_a_shared_flag_given_without_value(name, flag):
    """The options every TPU script shares (launch/common.sh) refuse a missing value by name, rather
    than failing on an unbound variable or taking the next flag as the value."""
    for args in ([flag], [flag, "--help"]):
        proc = subprocess.run(
            ["bash", os.path.join(LAUNCH, name), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PROJECT": "p"},
        )
        assert proc.returncode != 0 and f"{flag} needs a value" in proc.stderr, (args, proc.stderr)


def _with_fake_gcloud(tmp_path):
    """An environment whose ``gcloud`` only appends its arguments (one per line, then a blank line) to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    fake = bin_dir / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT": "p"}, log


def test_tpu_inputs_syncs_the_bucket_folder_on_every_worker(tmp_path):
    env, log = _with_fake_gcloud(tmp_path)
    proc = subprocess.run(
        [
            "bash",
            os.path.join(LAUNCH, "tpu_inputs.sh"),
            "--from",
            "gs://b/my inputs",
            "--to",
            "/data/in",
            "--name",
            "slice",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    call = log.read_text().split("\n")
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "slice"] and "--worker=all" in call
    command = next(a for a in call if a.startswith("--command="))[len("--command=") :]
    # The remote shell sees the folder names quoted (the space survives) and creates the target first.
    assert (
        command
        == "mkdir -p /data/in && gcloud storage rsync --recursive gs://b/my\\ inputs /data/in"
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--from", "/local/inputs"], "gs://"),
        (["--from", "gs://b/in", "--to", "rel/dir"], "absolute path"),
        (["--from"], "--from needs a value"),
    ],
)
def test_tpu_inputs_bad_arguments_are_named(tmp_path, args, match):
    env, log = _with_fake_gcloud(tmp_path)
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_inputs.sh"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode != 0 and match in proc.stderr and not log.exists()
