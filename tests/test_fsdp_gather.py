"""FSDP networks gather their parameters where they run (sharding.gathered_at_use): with the
parameters split, XLA may split the computation instead and move activations between devices;
gathered, only parameters move. The samplers hold their network whole instead
(sharding.sampler_shardings)."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import scflow_testlib as lib
from scflow_jax import checkpoint, distill, sharding, teacher, xla_gpu
from scflow_jax.tasks import build_task

_ACTIVATION_MOVES = re.compile(
    r"\b(all-reduce|all-to-all|reduce-scatter|collective-permute)(-start)?\("
)


def _network(params, x):
    """Two dense layers: the second contracts over the dimension FSDP split the kernel along."""
    return jnp.tanh(x @ params["w"]) @ params["w"].T


RULES = sharding.ShardingRules(fsdp_min_size=1)  # split even these small kernels


def _fsdp_inputs(mesh, batch=16):
    kernel = NamedSharding(
        mesh, P(None, sharding.FSDP_AXIS)
    )  # as RULES split it: along its output features
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 128)) / 8.0}
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 64))
    return jax.device_put(params, kernel), jax.device_put(x, sharding.batch_sharding(mesh))


def test_a_gathered_network_moves_only_its_parameters_and_keeps_the_batch_split():
    mesh = sharding.make_mesh(1, 8, 8)
    params, x = _fsdp_inputs(mesh)
    out = sharding.batch_sharding(mesh)
    plain = jax.jit(_network, out_shardings=out).lower(params, x).compile().as_text()
    gathered = (
        jax.jit(sharding.gathered_at_use(_network, mesh, RULES), out_shardings=out)
        .lower(params, x)
        .compile()
        .as_text()
    )
    assert _ACTIVATION_MOVES.search(plain), (
        "XLA no longer splits this network's computation: the test shows nothing"
    )
    assert not _ACTIVATION_MOVES.search(gathered)
    assert "all-gather" in gathered


def test_gathering_changes_neither_the_loss_nor_the_gradients_nor_their_layout():
    mesh = sharding.make_mesh(1, 8, 8)
    params, x = _fsdp_inputs(mesh)

    def loss(network):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(network(p, x) ** 2)))

    plain_loss, plain_grads = loss(_network)(params, x)
    loss_value, grads = loss(sharding.gathered_at_use(_network, mesh, RULES))(params, x)
    np.testing.assert_allclose(loss_value, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(grads["w"], plain_grads["w"], rtol=1e-5, atol=1e-7)
    assert grads["w"].sharding.is_equivalent_to(
        params["w"].sharding, 2
    )  # reduce-scattered back to FSDP's split


def test_without_an_fsdp_axis_the_network_is_left_as_it_is():
    assert sharding.gathered_at_use(_network, sharding.make_mesh(-1, 8)) is _network


def _gather_as_on_gpus(monkeypatch) -> list:
    """Turns on the GPUs' policy (xla_gpu.gathers_parameters_at_use) for this CPU's meshes; returns
    the list of networks wrapped by sharding.gathered_at_use from then on."""
    wrapped, gathered_at_use = [], sharding.gathered_at_use

    def recording(network_fn, mesh, rules=None):
        wrapped.append(network_fn)
        return gathered_at_use(network_fn, mesh, rules)

    monkeypatch.setattr(
        xla_gpu, "gathers_parameters_at_use", lambda mesh: sharding.fsdp_size(mesh) > 1
    )
    monkeypatch.setattr(sharding, "gathered_at_use", recording)
    return wrapped


def _one_distill_step(config, teacher_params):
    setup = distill.build_distill(config, workdir="", teacher_params=teacher_params)
    state, metrics = setup.train_step(
        setup.state, sharding.shard_batch(setup.data.batch(0), setup.mesh)
    )
    return lib.to_host(metrics), lib.to_host(state)


def test_the_distill_step_with_gathered_networks_matches_data_parallel(monkeypatch):
    base = dict(num_devices=8, mesh__fsdp_min_size=256)
    teacher_params = build_task(lib.make_config(**base)).init_params(jax.random.PRNGKey(0))
    dp_metrics, dp_state = _one_distill_step(lib.make_config(**base, mesh__fsdp=1), teacher_params)
    wrapped = _gather_as_on_gpus(monkeypatch)
    fs_metrics, fs_state = _one_distill_step(lib.make_config(**base, mesh__fsdp=4), teacher_params)
    assert len(wrapped) == 3  # student/target, teacher and discriminator
    lib.assert_trees_close(dp_metrics, fs_metrics, what="metrics", rtol=1e-5, atol=1e-5)
    lib.assert_trees_close(dp_state, fs_state, what="state", rtol=1e-5, atol=1e-5)


def test_the_teacher_step_gathers_its_network_under_the_gpu_policy(monkeypatch):
    config = lib.make_config(num_devices=8, mesh__fsdp=4)
    task, optimizer, root_key, _ = lib.teacher_init(config)
    mesh = sharding.mesh_from_config(config)
    wrapped = _gather_as_on_gpus(monkeypatch)
    teacher.make_train_step(task, config.teacher, optimizer, mesh, root_key)
    assert wrapped == [task.velocity_fn]


def test_the_samplers_hold_the_student_whole_on_an_fsdp_mesh(tmp_path, monkeypatch):
    # FSDP's default rules leave the tiny network whole; split even its kernels, as they split the
    # real ones.
    monkeypatch.setattr(
        sharding, "ShardingRules", functools.partial(sharding.ShardingRules, fsdp_min_size=1)
    )
    config = lib.make_config(num_devices=8, mesh__fsdp=4)
    task, mesh = build_task(config), sharding.mesh_from_config(config)
    params = task.init_params(jax.random.PRNGKey(0))
    assert any(
        not s.is_fully_replicated for s in jax.tree.leaves(sharding.state_shardings(params, mesh))
    )
    checkpoint.save_params(str(tmp_path / "student"), params)
    loaded = task.load_flow_params(str(tmp_path / "student"), mesh, "student parameters")
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(loaded))
    lib.assert_trees_close(lib.to_host(loaded), lib.to_host(params), what="student", rtol=0, atol=0)
