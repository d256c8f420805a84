"""scflow_jax.xla_cpu: the XLA:CPU flags are added only when safe and wanted."""
from scflow_jax import xla_cpu


def test_unknown_flag_is_detected_as_unsupported():
    assert not xla_cpu._supported("--xla_cpu_this_flag_does_not_exist=1")


def test_opt_out_and_user_setting_are_respected():
    env = {"SCFLOW_XLA_CPU_DEFAULTS": "0", "XLA_FLAGS": "--a=1"}
    assert not xla_cpu.apply_defaults(env) and env["XLA_FLAGS"] == "--a=1"
    env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert not xla_cpu.apply_defaults(env)
    assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"


def test_accelerator_only_runs_are_left_alone(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_supported", lambda flag: True)  # would add it, were CPU in use
    env = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--a=1"}
    assert not xla_cpu.apply_defaults(env) and env["XLA_FLAGS"] == "--a=1"
    env = {"JAX_PLATFORMS": "cuda,cpu"}
    assert xla_cpu.apply_defaults(env) and env["XLA_FLAGS"] == xla_cpu.YNN_FUSIONS_OFF


def test_added_exactly_when_this_xla_accepts_it():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = xla_cpu.apply_defaults(env)
    assert added == xla_cpu._supported(xla_cpu.YNN_FUSIONS_OFF)
    assert (xla_cpu.YNN_FUSIONS_OFF in env["XLA_FLAGS"]) == added
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2")
