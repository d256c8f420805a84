#!/usr/bin/env bash
# Copies the run's inputs (teacher weights, VAE, prepared latents, FID statistics, prompts...) from a
# bucket to the same local folder on every worker. The workdir lives on the bucket, but inputs are
# read from local paths: point the config at the folder this script fills.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --from gs://BUCKET/PATH [--to DIR] [--name NAME] [--zone ZONE] [--project ID]
  --from  bucket folder holding the inputs (required)
  --to    absolute folder on every worker's local disk (default: $INPUTS_DIR)
Idempotent: 'gcloud storage rsync' copies only what is missing or changed, so rerun it after
adding inputs. Config paths then name that folder, e.g.
  --config.model.teacher_path=$INPUTS_DIR/model_480.pth
USAGE
}

SOURCE=""
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --from) [[ $# -ge 2 ]] || die "--from needs a value"; SOURCE="$2"; shift 2 ;;
    --to) [[ $# -ge 2 ]] || die "--to needs a value"; INPUTS_DIR="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ "$SOURCE" == gs://* ]] || { usage >&2; die "--from must be a gs:// folder"; }
[[ "$INPUTS_DIR" == /* ]] || die "--to must be an absolute path (got $INPUTS_DIR): config paths name it as is"
require_project

SRC="$(printf '%q' "$SOURCE")"; DST="$(printf '%q' "$INPUTS_DIR")"  # quoted through ssh
tpu_ssh_all "mkdir -p $DST && gcloud storage rsync --recursive $SRC $DST"
echo "inputs of $SOURCE are in $INPUTS_DIR on every worker of $TPU_NAME"
