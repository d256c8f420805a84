"""Multi-process start-up: ``jax.distributed.initialize`` with errors instead of hangs.

Called by main.py before anything touches a JAX backend, only when ``--multihost`` or
``config.distributed.enabled`` asks (never at import). Fields left ``None`` are detected by
JAX from the environment (Cloud TPU metadata, SLURM variables, ...).

Why the wrapping: when the coordinator cannot be reached, or fewer processes than
``num_processes`` ever connect, JAX's client aborts the whole process with a C++
``DEADLINE_EXCEEDED`` stack trace after its timeout. Here a process other than the
coordinator first waits for the coordinator's port to accept connections, and JAX's own
start-up runs in a helper thread whose wait is bounded, so both cases raise a
``DistributedInitError`` that says which config field to check, within the timeout.
"""

from __future__ import annotations

import socket
import threading
import time

import jax
from absl import logging

# JAX's own deadline is set this much later than ours, so our message comes first.
_JAX_DEADLINE_MARGIN_S = 30


class DistributedInitError(RuntimeError):
    """The processes of a multi-host run could not form a cluster."""


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"config.distributed.coordinator_address={address!r} must be 'host:port'")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls ``host:port`` until it accepts a TCP connection; raises after ``timeout_s``."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:  # refused (not started yet), unresolvable, unreachable
            last_error = e
            time.sleep(0.2)
    raise DistributedInitError(
        f"the coordinator at {address} (config.distributed.coordinator_address) did not "
        f"accept connections within {timeout_s:g} s "
        f"(config.distributed.initialization_timeout); last error: {last_error}. Check that "
        f"process 0 is running on that host and port and that the port is reachable from "
        f"this machine."
    )


def initialize(cfg) -> None:
    """Joins this process to the cluster described by ``cfg`` (config.distributed)."""
    address, num_processes, process_id = (
        cfg.get("coordinator_address"),
        cfg.get("num_processes"),
        cfg.get("process_id"),
    )
    timeout = int(cfg.get("initialization_timeout", 300))
    if timeout <= 0:
        raise ValueError(f"config.distributed.initialization_timeout={timeout} must be > 0")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"config.distributed.num_processes={num_processes} must be >= 1")
    if (
        process_id is not None
        and num_processes is not None
        and not (0 <= process_id < num_processes)
    ):
        raise ValueError(
            f"config.distributed.process_id={process_id} must lie in "
            f"[0, config.distributed.num_processes={num_processes})"
        )
    # Older JAX had no CPU collectives by default; CPU clusters (and tests) need them.
    if hasattr(jax.config, "jax_cpu_collectives_implementation") and not (
        jax.config.jax_cpu_collectives_implementation
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    started = time.monotonic()
    if address and process_id not in (None, 0):
        wait_for_coordinator(address, timeout)
    logging.info(
        "joining the JAX cluster: coordinator %s, process %s of %s (None: detected)",
        address,
        process_id,
        num_processes,
    )

    outcome: dict = {}

    def connect():
        try:
            jax.distributed.initialize(
                coordinator_address=address,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=timeout + _JAX_DEADLINE_MARGIN_S,
            )
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            outcome["error"] = e

    # A daemon thread: if it never returns, the process can still exit with our error.
    thread = threading.Thread(target=connect, name="jax-distributed-init", daemon=True)
    thread.start()
    thread.join(max(1.0, timeout - (time.monotonic() - started)))
    if "error" in outcome:
        raise DistributedInitError(
            f"jax.distributed.initialize failed (coordinator {address}, process {process_id} "
            f"of {num_processes}; None means auto-detected): {outcome['error']}"
        ) from outcome["error"]
    if "ok" not in outcome:
        raise DistributedInitError(
            f"the JAX cluster did not form within {timeout} s "
            f"(config.distributed.initialization_timeout): not all of the "
            f"{num_processes or 'detected number of'} processes "
            f"(config.distributed.num_processes) connected to the coordinator at "
            f"{address or '(auto-detected)'}. Check that every process was launched, with "
            f"the same num_processes and distinct process_id values. Exit this process now: "
            f"JAX aborts it once its own deadline passes."
        )
    if num_processes is not None and jax.process_count() != num_processes:
        raise DistributedInitError(
            f"config.distributed.num_processes={num_processes} but JAX reports "
            f"{jax.process_count()} processes"
        )
    logging.info(
        "JAX cluster ready: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
