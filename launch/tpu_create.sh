#!/usr/bin/env bash
# Requests a Cloud TPU VM slice through queued resources and waits until it is ACTIVE.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") [--name NAME] [--zone ZONE] [--project ID] [--type ACCELERATOR]
                        [--version RUNTIME] [--spot] [--no-wait]
  --name      TPU VM name (env TPU_NAME, default: $TPU_NAME)
  --zone      zone (env ZONE, default: $ZONE)
  --project   GCP project (env PROJECT, default: gcloud's current project)
  --type      accelerator type, e.g. v4-8, v4-32, v5litepod-16 (default: v4-8)
  --version   TPU VM runtime version (default: tpu-ubuntu2204-base)
  --spot      request Spot capacity (cheaper, preemptible; training resumes from the
              latest checkpoint when rerun)
  --no-wait   return once the request is queued
USAGE
}

TYPE="v4-8"; VERSION="tpu-ubuntu2204-base"; SPOT=(); WAIT=1
while [[ $# -gt 0 ]]; do
  if take_common_option "$@"; then shift 2; continue; fi
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=(--spot); shift ;;
    --no-wait) WAIT=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
require_project

gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
  --zone="$ZONE" --project="$PROJECT" --accelerator-type="$TYPE" \
  --runtime-version="$VERSION" "${SPOT[@]}"

if [[ "$WAIT" == 1 ]]; then
  echo "waiting for $TPU_NAME to become ACTIVE (Ctrl-C stops waiting, not the request)"
  while true; do
    STATE="$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
      --project="$PROJECT" --format='value(state.state)')"
    echo "$(date +%T) $STATE"
    case "$STATE" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource $TPU_NAME is $STATE" ;;
    esac
    sleep 30
  done
fi
