"""``--mode=plan``: will a config's step fit the devices of a target, at its batch and mesh?

``plan_mode.plan(config, workdir)`` is the mode; ``targets`` names the hardware (this host, CPU
devices, deviceless GPUs and TPU slices), ``programs`` builds what is compiled from shapes alone,
``xla_memory`` reads XLA's buffer assignment, ``report`` prints the table. docs/planning.md says
how to run it.
"""

from scflow_jax.planning.plan_mode import plan  # noqa: F401
