# Shared settings of the Cloud TPU scripts (sourced, not run). Every value can be set in the
# environment or with the scripts' flags.
TPU_NAME="${TPU_NAME:-scflow}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
REPO_DIR="${REPO_DIR:-scflow_jax}"        # checkout location on every worker (under ~)
VENV_DIR="${VENV_DIR:-scflow_venv}"       # virtual environment on every worker (under ~)
INPUTS_DIR="${INPUTS_DIR:-/var/tmp/scflow_inputs}"  # inputs copied from a bucket by tpu_inputs.sh

die() { echo "error: $*" >&2; exit 1; }

# Takes the options every script shares (--name, --zone, --project VALUE) off the front of "$@":
# returns 0 when "$1" was one of them (the caller then shifts 2), 1 when it is not.
take_common_option() {
  case "$1" in
    --name | --zone | --project) [[ $# -ge 2 && "$2" != --* ]] || die "$1 needs a value" ;;
    *) return 1 ;;
  esac
  case "$1" in
    --name) TPU_NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
  esac
}

require_project() {
  [[ -n "$PROJECT" ]] || die "no GCP project: pass --project or run 'gcloud config set project ID'"
}

# Runs a command on every worker of the TPU VM (all hosts of a pod slice) at once.
tpu_ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}
