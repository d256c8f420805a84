"""The launch scripts (launch/): they parse, print their usage and name bad arguments;
``gcloud`` is a fake that records its arguments.
"""

import os
import shutil
import subprocess

import pytest

import scflow_testlib as lib

LAUNCH = os.path.join(lib.REPO_ROOT, "launch")
SCRIPTS = [
    "tpu_create.sh",
    "tpu_setup.sh",
    "tpu_inputs.sh",
    "tpu_run.sh",
    "tpu_logs.sh",
    "tpu_delete.sh",
    "slurm_gpu.sbatch",
    "common.sh",
]


@pytest.mark.parametrize("name", SCRIPTS)
def test_launch_script_parses(name):
    path = os.path.join(LAUNCH, name)
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    if name != "common.sh":
        assert "set -euo pipefail" in text and "Usage:" in text
    if shutil.which("shellcheck"):
        proc = subprocess.run(
            ["shellcheck", "-x", "-S", "warning", path], cwd=LAUNCH, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s.startswith("tpu_")])
def test_tpu_scripts_print_usage(name):
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, name), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PROJECT": "p"},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr


def test_tpu_run_requires_a_bucket_workdir():
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_run.sh"), "--workdir", "/tmp/x"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PROJECT": "p"},
    )
    assert proc.returncode != 0 and "gs://" in proc.stderr


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s.startswith("tpu_")])
@pytest.mark.parametrize("flag", ["--name", "--zone", "--project"])
def test_tpu_scripts_name_a_shared_flag_given_without_value(name, flag):
    """The options every TPU script shares (launch/common.sh) refuse a missing value by name, rather
    than failing on an unbound variable or taking the next flag as the value."""
    for args in ([flag], [flag, "--help"]):
        proc = subprocess.run(
            ["bash", os.path.join(LAUNCH, name), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PROJECT": "p"},
        )
        assert proc.returncode != 0 and f"{flag} needs a value" in proc.stderr, (args, proc.stderr)


def _with_fake_gcloud(tmp_path):
    """An environment whose ``gcloud`` only appends its arguments (one per line, then a blank line)
    to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    fake = bin_dir / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {log}\necho >> {log}\n')
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROJECT": "p"}, log


def test_tpu_inputs_syncs_the_bucket_folder_on_every_worker(tmp_path):
    env, log = _with_fake_gcloud(tmp_path)
    proc = subprocess.run(
        [
            "bash",
            os.path.join(LAUNCH, "tpu_inputs.sh"),
            "--from",
            "gs://b/my inputs",
            "--to",
            "/data/in",
            "--name",
            "slice",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    call = log.read_text().split("\n")
    assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "slice"] and "--worker=all" in call
    command = next(a for a in call if a.startswith("--command="))[len("--command=") :]
    # The remote shell sees the folder names quoted (the space survives) and creates the target
    # first.
    assert (
        command
        == "mkdir -p /data/in && gcloud storage rsync --recursive gs://b/my\\ inputs /data/in"
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--from", "/local/inputs"], "gs://"),
        (["--from", "gs://b/in", "--to", "rel/dir"], "absolute path"),
        (["--from"], "--from needs a value"),
    ],
)
def test_tpu_inputs_bad_arguments_are_named(tmp_path, args, match):
    env, log = _with_fake_gcloud(tmp_path)
    proc = subprocess.run(
        ["bash", os.path.join(LAUNCH, "tpu_inputs.sh"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode != 0 and match in proc.stderr and not log.exists()
