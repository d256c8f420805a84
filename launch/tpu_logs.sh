#!/usr/bin/env bash
# Shows the run log of one worker (worker 0 by default: the one that logs metrics).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--name NAME] [--zone ZONE] [--project ID] [--worker N|all]
                        [--lines N] [--follow]
  --worker   which worker's ~/scflow_run.log to show (default: 0; 'all' prints every one)
  --lines    how many trailing lines (default: 50)
  --follow   keep streaming (tail -f)
USAGE
}

WORKER=0; LINES=50; FOLLOW=""
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --worker) WORKER="$2"; shift 2 ;;
    --lines) LINES="$2"; shift 2 ;;
    --follow) FOLLOW="-f"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
require_project
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
  --worker="$WORKER" --command="tail -n $LINES $FOLLOW ~/scflow_run.log"
