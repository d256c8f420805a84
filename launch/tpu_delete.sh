#!/usr/bin/env bash
# Deletes the TPU VM slice and its queued resource (the gs:// workdir is kept).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--name NAME] [--zone ZONE] [--project ID] [--yes]
  --yes   do not ask for confirmation
USAGE
}

YES=0
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --yes) YES=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
require_project
if [[ "$YES" != 1 ]]; then
  read -r -p "delete TPU $TPU_NAME in $ZONE (project $PROJECT)? [y/N] " ANSWER
  [[ "$ANSWER" == y || "$ANSWER" == Y ]] || die "not deleted"
fi
# --force also deletes the TPU VM the queued resource created.
gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --force --quiet
