"""Sharding on 8 fake devices: mesh shapes, FSDP rules, an FSDP step against pure data
parallelism, checkpoints restored under another mesh, global batches split over devices and
processes, and gradient accumulation.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import scflow_testlib as lib
from scflow_jax import checkpoint, distill, sample, sharding, teacher, train_state, trainer
from scflow_jax.data.pipeline import InMemoryBatches
from scflow_jax.losses import flow_matching

# Losses and metrics agree to 1e-5: reductions run in a different order on different meshes.
TOL = dict(rtol=1e-5, atol=1e-5)


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
    lib.export_perturbed_teacher(teacher_path)
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
