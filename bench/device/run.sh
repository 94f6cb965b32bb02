#!/usr/bin/env bash
# The device run (docs/benchmarks.md, "The device run"): the whole tool on the lent GPU machine, a full-size
# Qwen2.5-3B shape, memory read by the device allocator. One command line for the device tool, with .whl
# carried (make device-kit builds it here):
#     bash bench/device/run.sh
# make device-rehearsal runs this same script here, on CPU, with the GPU image's versions and a small checkpoint:
#     DEVICE=cpu TP=4 LAYERS=2 PYTHON=.venv/bin/python IMAGE=.stacks/device-image OUT=out/device-rehearsal bash bench/device/run.sh
# Writes under $OUT (the device tool brings back at most 8 files): runs.jsonl (every run's phase JSON, each run
# opened by a {"run": ...} line and closed by a {"run_end": ...} line with its exit code and seconds),
# stderr.log (each run's last lines), bounds.jsonl, tunix.jsonl, env.txt, summary.txt (the RL cycle's rl_step
# lines are in runs.jsonl). Steps in the order they
# matter, each bounded; a step that would start past BUDGET_S is skipped and said so (the session's device
# time is 15 minutes for every try together: the whole run is meant to fit in 8).
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-gpu}
TP=${TP:-1}
LAYERS=${LAYERS:-36}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-out/device}
BUDGET_S=${BUDGET_S:-460}
STEP_S=${STEP_S:-240}
IMAGE=${IMAGE:-}  # rehearsal: the GPU image's versions (JAX 0.11.2, numpy, ...) as an overlay in front of .venv
start=$SECONDS
mkdir -p "$OUT"
: > "$OUT/runs.jsonl"; : > "$OUT/stderr.log"; : > "$OUT/summary.txt"

site=$(mktemp -d /tmp/param_swap_site.XXXXXX)
work=$(mktemp -d /tmp/param_swap_device.XXXXXX)
trap 'rm -rf "$site" "$work"' EXIT
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || { echo "the wheels in .whl/ did not install (make device-kit builds them)" | tee -a "$OUT/summary.txt"; exit 1; }
export PYTHONPATH="$site:$(pwd)${IMAGE:+:$(pwd)/$IMAGE}"  # $(pwd): run_param_swap, not installed there
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="$work/jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
{
  echo "date: $(date -u +%FT%TZ)  device: $DEVICE  tp: $TP  layers: $LAYERS  python: $("$PYTHON" -V 2>&1)"
  "$PYTHON" -c 'import importlib.metadata as m
for d in ("sglang-jax", "jax", "jaxlib", "jax-cuda13-plugin", "flax", "transformers", "tokenizers", "numpy", "torch", "safetensors", "google-tunix"):
    try: print(f"{d} {m.version(d)}")
    except m.PackageNotFoundError: print(f"{d} -")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} > "$OUT/env.txt" 2>&1

left() { echo $(( BUDGET_S - (SECONDS - start) )); }
step() {  # name, timeout-capped command...
  local name=$1; shift
  local limit=$(( $(left) < STEP_S ? $(left) : STEP_S ))
  if [ "$limit" -lt 20 ]; then echo "$name: skipped (budget)" | tee -a "$OUT/summary.txt"; return; fi
  local t0=$SECONDS code
  printf '{"run": "%s", "command": "%s"}\n' "$name" "$*" >> "$OUT/runs.jsonl"
  timeout -k 10 "$limit" "$@" > "$work/$name.out" 2> "$work/$name.err"; code=$?
  cat "$work/$name.out" >> "$OUT/runs.jsonl"
  { echo "=== $name (exit $code, $(( SECONDS - t0 )) s)"; tail -n 60 "$work/$name.err"; } >> "$OUT/stderr.log"
  printf '{"run_end": "%s", "exit_code": %d, "seconds": %d}\n' "$name" "$code" "$(( SECONDS - t0 ))" >> "$OUT/runs.jsonl"
  echo "$name: exit $code in $(( SECONDS - t0 )) s" | tee -a "$OUT/summary.txt"
}
TOOL=("$PYTHON" run_param_swap.py --device "$DEVICE" --tp-size "$TP")

# a. the demo with both oracles
step demo "${TOOL[@]}" --demo
# b. the full-size shape, written here from the config (no download); streaming with everything on, then bulk
"$PYTHON" bench/device/write_checkpoint.py "$work/ckpt" "$LAYERS" >> "$OUT/summary.txt" 2>> "$OUT/stderr.log"
ckpt="$work/ckpt"
FULL=(--model-id "$ckpt" --keep-param-dict --verify-param-sharing --verify-weights --max-new-tokens 32)
step streaming "${TOOL[@]}" "${FULL[@]}"
# f. the colocated RL cycle at full size: release (KV and weights), a donating AdamW step, resume, rollout; the
#    allocator's figures at the four points of each step
step rl_cycle "${TOOL[@]}" --model-id "$ckpt" --weights-source trainer --trainer-sharding engine --alias \
  --rl-steps 3 --max-total-tokens 32768 --max-new-tokens 32
# d. the bounds the swap is compared with, in one process: a plain device_put of the same host bytes, a plain
#    device-to-device copy of the same arrays
step bounds "$PYTHON" bench/device/bounds.py "$ckpt" "$DEVICE" "$TP"
grep '"bounds"' "$work/bounds.out" > "$OUT/bounds.jsonl" 2>/dev/null
step bulk "${TOOL[@]}" "${FULL[@]}" --swap-mode bulk
# c. the same checkpoint from a trainer-resident source: FSDP, and the engine's layout with --alias
step trainer_fsdp "${TOOL[@]}" "${FULL[@]}" --weights-source trainer --trainer-sharding fsdp
step trainer_alias "${TOOL[@]}" "${FULL[@]}" --weights-source trainer --trainer-sharding engine --alias
# e. tunix's update_params from the same host and device sources, if its wheel came in the kit
if "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("tunix") is None)'; then
  step tunix_host "$PYTHON" bench/tunix_sync.py --model-id "$ckpt" --device "$DEVICE" --tp-size "$TP" --source host
  step tunix_device "$PYTHON" bench/tunix_sync.py --model-id "$ckpt" --device "$DEVICE" --tp-size "$TP" --source device
  cat "$work"/tunix_*.out > "$OUT/tunix.jsonl" 2>/dev/null
else
  echo "tunix: not in the kit (skipped)" | tee -a "$OUT/summary.txt"
fi
echo "total: $(( SECONDS - start )) s" | tee -a "$OUT/summary.txt"
! grep -q ": exit [^0]" "$OUT/summary.txt"
