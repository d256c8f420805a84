"""scflow_jax.xla_cpu: the XLA:CPU flags are added only when safe and wanted, without a probe
process."""

import os
import subprocess
import sys

from scflow_jax import xla_cpu


def _starts_a_cpu_backend(xla_flags: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    return probe.returncode == 0


def test_the_installed_jaxlib_is_a_checked_release_and_accepts_the_flag():
    # Fails when a new jaxlib is installed: check the flag on it, then add its series.
    assert xla_cpu.jaxlib_series() in xla_cpu.CHECKED_JAXLIB
    assert _starts_a_cpu_backend(xla_cpu.YNN_FUSIONS_OFF)
    # The check above can fail: an unknown flag does abort XLA's start-up.
    assert not _starts_a_cpu_backend("--xla_cpu_this_flag_does_not_exist=1")


def test_added_only_for_checked_releases():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_defaults(env, series=(0, 10))
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.YNN_FUSIONS_OFF}"
    env = {}
    assert not xla_cpu.apply_defaults(env, series=(0, 99)) and "XLA_FLAGS" not in env


def test_opt_out_and_user_setting_are_respected():
    env = {"SCFLOW_XLA_CPU_DEFAULTS": "0", "XLA_FLAGS": "--a=1"}
    assert not xla_cpu.apply_defaults(env, series=(0, 10)) and env["XLA_FLAGS"] == "--a=1"
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert not xla_cpu.apply_defaults(env, series=(0, 10))
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_accelerator_only_runs_are_left_alone():
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--a=1"}
    assert not xla_cpu.apply_defaults(env, series=(0, 10)) and env["XLA_FLAGS"] == "--a=1"
    env = {"JAX_PLATFORMS": "cuda,cpu"}
    assert (
        xla_cpu.apply_defaults(env, series=(0, 10)) and env["XLA_FLAGS"] == xla_cpu.YNN_FUSIONS_OFF
    )
