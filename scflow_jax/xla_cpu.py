"""XLA:CPU settings, applied before JAX creates its backends (they are read once, at start-up).

One setting: XLA's YNNPACK convolution fusions are switched off
(``--xla_cpu_experimental_ynn_fusion_type=`` with an empty list). On the project's 2-core CPUs
XLA's own convolution emitters run this project's networks markedly faster than the YNNPACK
fusions (docs/performance.md has the figures); it changes nothing on GPUs and TPUs.

The flag is experimental, and an XLA that does not know a flag aborts the process at start-up.
So it is added only for the jaxlib releases it has been checked on (``CHECKED_JAXLIB``, read
from the installed package's metadata: no import, no subprocess), never when the user already
sets it (or sets ``SCFLOW_XLA_CPU_DEFAULTS=0``), nor when ``JAX_PLATFORMS`` names only other
platforms. A newer jaxlib runs with XLA's defaults until its release is checked and added.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

YNN_FUSIONS_OFF = "--xla_cpu_experimental_ynn_fusion_type="
# Release series (major, minor) whose XLA accepts the flag, each checked by starting a CPU backend
# with it (tests/test_xla_cpu.py checks the installed one).
CHECKED_JAXLIB = ((0, 10), (0, 11), (0, 12))


def jaxlib_series() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib, or None where it is missing or unreadable."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def apply_defaults(environ=os.environ, series: tuple[int, int] | None = None) -> bool:
    """Adds the project's XLA:CPU flags to ``XLA_FLAGS``; returns whether it did. Call it before the
    first JAX computation of the process. ``series``: the jaxlib release (default: installed)."""
    if environ.get("SCFLOW_XLA_CPU_DEFAULTS", "1") == "0":
        return False
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.lower().split(","):
        return False
    current = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in current:
        return False
    if (series or jaxlib_series()) not in CHECKED_JAXLIB:
        return False
    environ["XLA_FLAGS"] = f"{current} {YNN_FUSIONS_OFF}".strip()
    return True
