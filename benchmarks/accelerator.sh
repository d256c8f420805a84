#!/usr/bin/env bash
# Every accelerator figure of the project in one call on one GPU, in under 8 minutes:
#   1. peak       a large bf16 matmul (the device's usable matrix rate, the MFU yardstick beside the datasheet)
#   2. attention  benchmarks/attention_check.py: the SD UNet's attention on the card (cuDNN's fused kernel, which a CPU
#                 host compiles but never runs) against XLA's: same values and gradients? time of each
#   3. generate   SD 1.5 1-step 512 px generation (UNet + VAE decode, bf16): images/s at batch 32, latency at batch 1
#   4. t2i        the SD 1.5 recipe's SCFlow distillation step (bf16, remat): step time, memory, MFU, at the
#                 paper's 20 samples per GPU, which XLA:GPU's own plan for an H100 fits (--mode=plan,
#                 docs/planning.md), cuDNN's fused attention included (models/attention.py). Should it fail,
#                 it runs again at batch 8 with XLA's attention (SCFLOW_ATTENTION=xla).
#   5. issue 8    benchmarks/distill_step.py: the side-by-side latent CelebA-HQ work, then its --full size
# Each part runs in its own process under its own time limit, so one that fails or overruns costs only itself.
# The figures (with the device and versions) are appended to $OUT/results.json, the logs written to $OUT.
#
# Usage (repository root; jax with CUDA, flax, optax, orbax-checkpoint, ml_collections, clu installed):
#   bash benchmarks/accelerator.sh                   # BUDGET_S=470 seconds in all; OUT=benchmarks/accelerator_out
#   PARTS="generate t2i" bash benchmarks/accelerator.sh
#   SMOKE=1 JAX_PLATFORMS=cpu bash benchmarks/accelerator.sh   # tiny sizes: checks the wiring, figures mean nothing
#                                      (on a CPU, with LIMIT_SCALE=4 time limits: compiles take minutes there)
# On an offline machine that has jax with CUDA, flax and optax but lacks ml_collections and clu, bring their
# pure-Python wheels from a connected one and install them first:
#   pip download --no-deps -d .whl ml_collections clu importlib_resources            # connected machine
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site   # offline
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/accelerator_out}
PY=${PYTHON:-python3}
LIMIT_SCALE=${LIMIT_SCALE:-$([[ ${SMOKE:-0} == 1 ]] && echo 4 || echo 1)}  # every time limit times this
BUDGET_S=${BUDGET_S:-$((470 * LIMIT_SCALE))}
PARTS=${PARTS:-"peak attention generate t2i issue8 issue8_full"}
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The t2i step holds 21.6 GiB of state (fp32 student, Adam, EMAs, D; bf16 teacher) plus activations; the larger
# pool is for the retry with XLA's attention, whose activations are several times cuDNN's.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
mkdir -p "$OUT"
export SCFLOW_BENCHMARK_RESULTS="$(cd "$OUT" && pwd)/results.json"  # where every part records (common.py)
SMALL=() ISSUE8_FLAGS=() FULL=(--full) ATTENTION_FLAGS=()
if [[ ${SMOKE:-0} == 1 ]]; then  # tiny networks everywhere, --full included
  SMALL=(--tiny --no_record) ISSUE8_FLAGS=(--tiny --repeats=2 --warmup=1 --no_record) FULL=()
  ATTENTION_FLAGS=(--tiny --no_record --rows=2)
fi
deadline=$((SECONDS + BUDGET_S))

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"; } \
  >"$OUT/device.txt" 2>&1
"$PY" -c 'import jax, jaxlib, flax, optax, sys; print("python", sys.version.split()[0], "jax", jax.__version__,
"jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' \
  >>"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# part NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S x LIMIT_SCALE seconds (fewer if the budget is
# short).
part() {
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((deadline - SECONDS))
  if ((left < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return 0; fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$PY" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"
  grep -E '^\{' "$OUT/$name.log" | tail -n 1 | cut -c1-1500
  ((rc == 0)) || tail -n 15 "$OUT/$name.log"
  return $rc
}

part peak 60 benchmarks/t2i_speed.py --part=peak "${SMALL[@]}"
part attention 60 benchmarks/attention_check.py "${ATTENTION_FLAGS[@]}"
part generate 150 benchmarks/t2i_speed.py --part=generate --batch_sizes=1,32 "${SMALL[@]}"
part t2i 300 benchmarks/t2i_speed.py --part=distill --batch=20 "${SMALL[@]}"
rc=$?
if ((rc != 0 && rc != 124 && rc != 137)); then  # failed (cuDNN, out of memory) rather than ran out of time
  SCFLOW_ATTENTION=xla PARTS="$PARTS t2i_xla_b8" part t2i_xla_b8 240 benchmarks/t2i_speed.py --part=distill \
    --batch=8 "${SMALL[@]}"
fi
part issue8 120 benchmarks/distill_step.py "${ISSUE8_FLAGS[@]}"
part issue8_full 150 benchmarks/distill_step.py "${FULL[@]}" "${ISSUE8_FLAGS[@]}"
