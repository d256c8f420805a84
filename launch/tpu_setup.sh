#!/usr/bin/env bash
# Copies this checkout to every worker and installs it into a virtual environment there.
# Idempotent: rerunning updates the code and reuses the environment.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--name NAME] [--zone ZONE] [--project ID] [--extras EXTRAS]
  Copies the repository (git-tracked files) to ~/$REPO_DIR on every worker and runs
  'pip install -e .[EXTRAS]' plus jax[tpu] in ~/$VENV_DIR.
  --extras    pip extras of this package to install (default: gcs, for gs:// workdirs)
USAGE
}

EXTRAS="[gcs]"  # the workdir lives on a gs:// bucket
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --extras) EXTRAS="[$2]"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
require_project

ROOT="$(cd "$HERE/.." && pwd)"
ARCHIVE="$(mktemp -t scflow_src.XXXXXX).tar.gz"
trap 'rm -f "$ARCHIVE"' EXIT
git -C "$ROOT" ls-files -z | tar -C "$ROOT" --null -T - -czf "$ARCHIVE"
gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:~/scflow_src.tar.gz" --zone="$ZONE" \
  --project="$PROJECT" --worker=all

tpu_ssh_all "set -euo pipefail
  mkdir -p ~/$REPO_DIR && tar -xzf ~/scflow_src.tar.gz -C ~/$REPO_DIR
  [ -x ~/$VENV_DIR/bin/python ] || python3 -m venv ~/$VENV_DIR
  ~/$VENV_DIR/bin/pip install -q --upgrade pip
  ~/$VENV_DIR/bin/pip install -q 'jax[tpu]'
  ~/$VENV_DIR/bin/pip install -q -e ~/$REPO_DIR'$EXTRAS'
  ~/$VENV_DIR/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices\")'"
