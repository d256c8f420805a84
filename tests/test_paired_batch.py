"""Two batches through one network call: the interleaved layout round-trips and, on a batch-sharded
mesh, moves no data between devices (joined end to end it does, and XLA then ran the SD step's
doubled batches unsharded)."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from scflow_jax import paired_batch, sharding


def test_join_interleaves_and_split_undoes_it():
    a = jnp.arange(12.0).reshape(3, 2, 2)
    b = -a - 1.0
    joined = paired_batch.join(a, b)
    assert joined.shape == (6, 2, 2)
    np.testing.assert_array_equal(joined[0::2], a)
    np.testing.assert_array_equal(joined[1::2], b)
    got_a, got_b = paired_batch.split(joined)
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    t_a, t_b = paired_batch.split(
        paired_batch.join(jnp.array([0.1, 0.2]), jnp.array([0.3, 0.4]))
    )  # rank 1: times
    np.testing.assert_array_equal(t_a, np.float32([0.1, 0.2]))
    np.testing.assert_array_equal(t_b, np.float32([0.3, 0.4]))


_DATA_MOVES = re.compile(r"all-to-all|collective-permute|all-gather|all-reduce")


def _compiled_paired_call(join, split, mesh, batch: int) -> jax.stages.Compiled:
    """A per-sample 'network' on two batch-sharded batches joined into one call, then split
    again."""

    def fn(a, b):
        first, second = split(jnp.tanh(join(a, b)) * 2.0)
        return first - second

    rows = jax.ShapeDtypeStruct(
        (batch, 4, 4, 3), jnp.float32, sharding=sharding.batch_sharding(mesh)
    )
    return jax.jit(fn).lower(rows, rows).compile()


def test_paired_batches_stay_on_their_devices_where_concatenated_ones_do_not():
    mesh = sharding.make_mesh(num_data=2, num_devices=4, num_fsdp=2)
    paired = _compiled_paired_call(paired_batch.join, paired_batch.split, mesh, batch=8)
    assert not _DATA_MOVES.findall(paired.as_text())
    assert paired.output_shardings.spec == jax.sharding.PartitionSpec(sharding.BATCH_AXES)

    # The end-to-end layout this replaces: XLA reshuffles the rows across devices (or gathers them).
    end_to_end = _compiled_paired_call(
        lambda a, b: jnp.concatenate([a, b]), lambda y: (y[:8], y[8:]), mesh, 8
    )
    assert _DATA_MOVES.findall(end_to_end.as_text())
