#!/usr/bin/env bash
# Runs the same training command on every worker of the slice (one process per host),
# in the background, logging to ~/scflow_run.log on each worker.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --workdir gs://BUCKET/PATH [--name NAME] [--zone ZONE] [--project ID]
                        [--mode MODE] [--foreground] [-- EXTRA_FLAGS...]
  --workdir     run directory on a gs:// bucket that every worker can write (required;
                checkpoints are written collectively by all workers)
  --mode        all | train_teacher | distill | evaluate | sample (default: all)
  --foreground  stream the output instead of detaching (Ctrl-C does not stop the workers)
  EXTRA_FLAGS   passed to scflow_jax.main, e.g. --config=configs/default.py
                --config.mesh.fsdp=4 --config.distill.batch_size=256
Rerunning the same command resumes from the latest checkpoint in the workdir.
USAGE
}

WORKDIR=""; MODE="all"; FOREGROUND=0; EXTRA=()
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --workdir) WORKDIR="$2"; shift 2 ;;
    --mode) MODE="$2"; shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$WORKDIR" == gs://* ]] || { usage >&2; die "--workdir must be a gs:// path shared by all workers"; }
require_project

# printf %q keeps spaces and quotes of the extra flags intact through ssh.
ARGS="$(printf ' %q' --multihost --workdir="$WORKDIR" --mode="$MODE" "${EXTRA[@]}")"
CMD="cd ~/$REPO_DIR && ~/$VENV_DIR/bin/python -m scflow_jax.main$ARGS"
if [[ "$FOREGROUND" == 1 ]]; then
  tpu_ssh_all "$CMD 2>&1 | tee ~/scflow_run.log"
else
  tpu_ssh_all "nohup bash -c $(printf '%q' "$CMD") > ~/scflow_run.log 2>&1 < /dev/null &"
  echo "started on all workers of $TPU_NAME; follow with: $HERE/tpu_logs.sh --name $TPU_NAME"
fi
