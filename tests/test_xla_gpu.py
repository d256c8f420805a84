"""What the training steps do differently on several GPUs (xla_gpu.py): which meshes get synchronous
collectives (the config field, and that the stages compile their step with them) and which gather
FSDP parameters where a network runs (and that the stages' networks do)."""

import types

import jax
import numpy as np
import pytest

import scflow_testlib as lib
from scflow_jax import distill, sharding, teacher, xla_gpu
from scflow_jax.tasks import build_task

# An option value XLA refuses: a step compiled with it fails, naming the option, which shows
# that the options reach XLA (on CPU, where the real GPU options would change nothing).
REFUSED = {"xla_gpu_disable_async_collectives": "NOT_A_COLLECTIVE"}


def stub_mesh(platform: str, count: int, fsdp: int = 1):
    """What xla_gpu reads of a mesh, for platforms this machine does not have."""
    return types.SimpleNamespace(
        shape={"data": count // fsdp, "fsdp": fsdp},
        devices=np.array(
            [types.SimpleNamespace(platform=platform) for _ in range(count)], dtype=object
        ),
    )


def test_several_gpus_run_collectives_synchronously_unless_asked_to_overlap():
    assert xla_gpu.step_compiler_options(stub_mesh("gpu", 2)) == {
        "xla_gpu_disable_async_collectives": "ALLREDUCE,REDUCESCATTER,ALLGATHER"
    }
    assert xla_gpu.step_compiler_options(stub_mesh("gpu", 8), overlap_collectives=True) is None
    assert xla_gpu.step_compiler_options(stub_mesh("gpu", 1)) is None  # no collectives to run


def test_cpu_and_tpu_meshes_get_no_options():
    assert xla_gpu.step_compiler_options(sharding.make_mesh(-1, 8)) is None
    assert xla_gpu.step_compiler_options(stub_mesh("tpu", 8)) is None


def test_the_config_field_chooses_and_a_non_bool_is_named():
    config = lib.make_config()
    assert config.mesh.overlap_collectives is False
    assert xla_gpu.from_config(config, stub_mesh("gpu", 2)) == xla_gpu.SYNC_COLLECTIVES
    config.mesh.overlap_collectives = True
    assert xla_gpu.from_config(config, stub_mesh("gpu", 2)) is None
    del config.mesh["overlap_collectives"]  # an older config without the field: the default
    assert xla_gpu.from_config(config, stub_mesh("gpu", 2)) == xla_gpu.SYNC_COLLECTIVES
    config.mesh.overlap_collectives = "yes"
    with pytest.raises(ValueError, match=r"config.mesh.overlap_collectives='yes'"):
        xla_gpu.from_config(config, stub_mesh("gpu", 2))


def test_the_distill_stage_compiles_its_step_with_the_configs_options(monkeypatch):
    config = lib.make_config()
    teacher_params = build_task(config).init_params(jax.random.PRNGKey(0))
    monkeypatch.setattr(xla_gpu, "step_compiler_options", lambda mesh, overlap: dict(REFUSED))
    setup = distill.build_distill(config, workdir="", teacher_params=teacher_params)
    batch = sharding.shard_batch(setup.data.batch(0), setup.mesh)
    with pytest.raises(Exception, match="xla_gpu_disable_async_collectives"):
        setup.train_step(setup.state, batch)


def test_the_teacher_stage_compiles_its_step_with_the_configs_options(monkeypatch, tmp_path):
    monkeypatch.setattr(xla_gpu, "step_compiler_options", lambda mesh, overlap: dict(REFUSED))
    with pytest.raises(Exception, match="xla_gpu_disable_async_collectives"):
        teacher.train_teacher(lib.make_config(), str(tmp_path))


def test_only_fsdp_meshes_of_several_gpus_gather_parameters_where_networks_run():
    assert xla_gpu.gathers_parameters_at_use(stub_mesh("gpu", 8, fsdp=4))
    assert not xla_gpu.gathers_parameters_at_use(stub_mesh("gpu", 8, fsdp=1))  # nothing is split
    assert not xla_gpu.gathers_parameters_at_use(
        stub_mesh("tpu", 8, fsdp=8)
    )  # XLA:TPU: more memory with it
    assert not xla_gpu.gathers_parameters_at_use(sharding.make_mesh(1, 8, 8))  # CPU
