"""Deterministic in-memory batching: the batch at step s is a pure function of (seed, s).

That is what makes a resumed run (after SIGTERM or SIGKILL) see exactly the examples an
uninterrupted run would have seen. Each process loads only its own rows of the global
batch (multi-host data loading without a coordinator): by default the process_index-th
contiguous slice, or exactly ``process_rows`` (sharding.process_batch_indices: the rows the
mesh places on this process's devices).
"""

from __future__ import annotations

import jax
import numpy as np


def check_process_rows(process_rows, global_batch: int) -> np.ndarray:
    """``process_rows`` as an integer array, after checking it names distinct rows of a global
    batch of ``global_batch`` (a wrong list would silently feed wrong or repeated examples)."""
    rows = np.asarray(process_rows)
    if rows.ndim != 1 or not len(rows) or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(
            f"process_rows must be a non-empty 1-D array of row indices, got "
            f"{rows.dtype} array of shape {rows.shape}"
        )
    if rows.min() < 0 or rows.max() >= global_batch:
        raise ValueError(
            f"process_rows holds rows outside the global batch of {global_batch}: "
            f"{rows[(rows < 0) | (rows >= global_batch)].tolist()}"
        )
    if len(np.unique(rows)) != len(rows):
        raise ValueError(f"process_rows repeats rows: {rows.tolist()}")
    return rows


class InMemoryBatches:
    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        global_batch: int,
        seed: int,
        process_rows: np.ndarray | None = None,
    ):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different lengths: {sizes}")
        self.arrays = arrays
        self.num_examples = next(iter(sizes.values()))
        if global_batch > self.num_examples:
            raise ValueError(
                f"global batch {global_batch} exceeds the dataset size {self.num_examples}"
            )
        self.global_batch = global_batch
        self.seed = seed
        if process_rows is None:
            per_process = global_batch // jax.process_count()
            process_rows = np.arange(
                jax.process_index() * per_process, (jax.process_index() + 1) * per_process
            )
        self.process_rows = check_process_rows(process_rows, global_batch)
        self.steps_per_epoch = self.num_examples // global_batch
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> np.ndarray:
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        return self._permutation(epoch)[start : start + self.global_batch]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch of ``step``."""
        idx = self.global_indices(step)[self.process_rows]
        return {k: v[idx] for k, v in self.arrays.items()}
