"""XLA:CPU settings, applied before JAX creates its backends (they are read once, at start-up).

One setting so far: XLA's YNNPACK convolution fusions are switched off
(``--xla_cpu_experimental_ynn_fusion_type=`` with an empty list). Measured on this project's
2-core CPU machine with jax 0.10.2 (benchmarks/distill_step.py, machine otherwise idle): the
ADM UNet forward of batch 64 went from 0.44 s to 0.27 s and the SCFlow iteration from 3.28 s to
2.13 s; the YNN convolutions ran at 77-155 GFLOP/s against the default emitters' ~2x that.

The flag is experimental: an XLA that does not know it aborts the process at start-up. So it is
added only after a child interpreter has started a CPU backend with it, and never when the user
already sets it (or sets ``SCFLOW_XLA_CPU_DEFAULTS=0``), nor when ``JAX_PLATFORMS`` names only
other platforms (``cuda``, ``tpu``: no probe is started). It only affects CPU code; GPU and TPU
runs are unchanged.
"""
from __future__ import annotations

import os
import subprocess
import sys

YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _supported(flag: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"],
                               env=env, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def apply_defaults(environ=os.environ) -> bool:
    """Adds the project's XLA:CPU flags to ``XLA_FLAGS``; returns whether it did. Call it before
    the first JAX computation of the process."""
    if environ.get("SCFLOW_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.lower().split(","):
        return False
    current = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in current or not _supported(YNN_FUSIONS_OFF):
        return False
    environ["XLA_FLAGS"] = f"{current} {YNN_FUSIONS_OFF}".strip()
    return True
