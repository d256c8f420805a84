"""Orbax checkpointing: async, atomic, keep-N, with restore checks that name the problem.

Orbax writes each step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; ``latest_step`` only sees finished
ones. Restores compare the saved tree with the expected one first, so a checkpoint from
another configuration fails with the name of the first mismatched parameter instead of a
deep Orbax/TensorStore error.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree or shapes do not match what the configuration builds."""


def absolute(directory: str) -> str:
    """An absolute local path, or a cloud URL (``gs://...``, for multi-host runs) unchanged."""
    return directory if "://" in directory else os.path.abspath(directory)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shape_of(meta) -> tuple | None:
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def check_tree_compatible(saved: Any, expected: Any, source: str) -> None:
    """Raises CheckpointMismatchError naming the first missing, unexpected or mis-shaped leaf."""
    saved_leaves = {_path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
    expected_leaves = {
        _path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    missing = [k for k in expected_leaves if k not in saved_leaves]
    if missing:
        raise CheckpointMismatchError(
            f"{source}: parameter {missing[0]!r} is expected by the configuration but missing "
            f"from the checkpoint ({len(missing)} missing in all); was it written with "
            f"another model configuration?"
        )
    unexpected = [k for k in saved_leaves if k not in expected_leaves]
    if unexpected:
        raise CheckpointMismatchError(
            f"{source}: checkpoint has parameter {unexpected[0]!r} that the configuration "
            f"does not build ({len(unexpected)} unexpected in all)"
        )
    for key, abstract in expected_leaves.items():
        saved_shape = _shape_of(saved_leaves[key])
        want = tuple(getattr(abstract, "shape", ()))
        if saved_shape is not None and saved_shape != want:
            raise CheckpointMismatchError(
                f"{source}: parameter {key!r} has shape {saved_shape} in the checkpoint but "
                f"the configuration builds {want}"
            )


def _abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


class Checkpointer:
    """A CheckpointManager for one training stage's directory."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        # The explicit handler lets a fresh manager (a resumed run) read the saved tree's
        # metadata before restoring; without it Orbax cannot say what the item is.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, shardings: Any, step: int | None = None) -> Any:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        saved = self._manager.item_metadata(step)
        saved = getattr(saved, "tree", saved)
        check_tree_compatible(saved, abstract_state, f"checkpoint {self.directory} step {step}")
        target = _abstract_with_shardings(abstract_state, shardings)
        return self._manager.restore(step, args=ocp.args.StandardRestore(target))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_params(directory: str, params: Any) -> None:
    """Writes a standalone parameter tree (a stage's exported result), atomically, synchronously."""
    directory = absolute(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params, force=True)


def params_exist(directory: str) -> bool:
    """Orbax renames a finished save into place, so a non-empty directory is a complete one."""
    path = epath.Path(absolute(directory))
    return path.is_dir() and any(True for _ in path.iterdir())


def load_params(directory: str, abstract_params: Any, shardings: Any, *, what: str) -> Any:
    """Restores a parameter tree saved by ``save_params`` after checking every name and shape."""
    directory = absolute(directory)
    if not epath.Path(directory).is_dir():
        raise FileNotFoundError(f"{what}: no parameter checkpoint at {directory}")
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(directory)
        saved = getattr(saved, "item_metadata", saved)
        check_tree_compatible(saved, abstract_params, f"{what} ({directory})")
        return ckptr.restore(directory, _abstract_with_shardings(abstract_params, shardings))
