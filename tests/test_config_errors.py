"""Error paths checked before any compilation: mesh shape, dataset name, SCFlow settings."""

import pytest

from scflow_jax import distill, sharding, tasks


def test_mesh_data_axis_must_match_devices():
    with pytest.raises(ValueError, match=r"config.mesh.data=3 does not match the 8 devices"):
        sharding.make_mesh(3, -1)


def test_mesh_cannot_use_more_devices_than_exist():
    with pytest.raises(ValueError, match=r"config.mesh.num_devices=16 but 8 devices"):
        sharding.make_mesh(-1, 16)


def test_mesh_uses_the_first_n_devices():
    mesh = sharding.make_mesh(-1, 2)
    assert mesh.devices.size == 2 and mesh.axis_names == sharding.BATCH_AXES


def test_mesh_lays_over_the_devices_it_is_given():
    import jax

    given = jax.devices()[4:]
    mesh = sharding.make_mesh(2, -1, 2, devices=given)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in given)
    with pytest.raises(ValueError, match=r"config.mesh.num_devices=8 but 4 devices"):
        sharding.make_mesh(-1, 8, devices=given)


def test_unknown_dataset_is_named(tiny_config):
    tiny_config.data.name = "imagenet"
    with pytest.raises(ValueError, match=r"config.data.name='imagenet'"):
        tasks.build_task(tiny_config)


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_ema", 1.5),
        ("eval_ema", -0.1),
        ("huber_c", 0.0),
        ("lambda_rf", -0.1),
    ],
)
def test_scflow_settings_out_of_range_are_named(tiny_config, field, value):
    tiny_config.scflow[field] = value
    with pytest.raises(ValueError, match=rf"config.scflow.{field}="):
        distill.validate_scflow_config(tiny_config.scflow)


def test_default_scflow_settings_are_valid(tiny_config):
    distill.validate_scflow_config(tiny_config.scflow)  # raises if the defaults were invalid
