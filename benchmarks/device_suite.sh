#!/usr/bin/env bash
# The accelerator suite: 7B shapes in bf16 (random weights, nothing downloaded): dense vs Dynamic-LLaVA's
# training step (with MFU against PEAK_TFLOPS), prefill and KV-cache decoding, then the sibling methods'
# prefill (MQT at m of M visual tokens, a layer-pruned model). Run it when the `device` tool lends a GPU,
# from the repository root:
#
#     OUT=/tmp/out PEAK_TFLOPS=989 bash benchmarks/device_suite.sh      # H100/H200 SXM dense bf16 peak
#     SIZE=tiny OUT=/tmp/out bash benchmarks/device_suite.sh            # the same script in a minute on a CPU
#
# Writes $OUT/device_suite.log and one JSON per part (train_step, prefill_decode, mqt_prefill, prune_prefill);
# each part has its own time limit, so one that fails or overruns leaves the others their time, and the
# whole suite ends in under 8 minutes (480 s of limits; 630 s where the training step needs a second try
# with remat). The machine needs this package's runtime dependencies as far as
# the benchmarks import them: numpy, jax, flax (0.12), optax and ml_collections. Where some are missing
# and there is no network, carry wheels in .whl/ (e.g. `pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl ml_collections==1.1.0 flax==0.12.8`): the script installs ml_collections
# from there, and flax when the machine's flax is not a 0.12 release.
set -u
OUT=${OUT:-runs/device}
SIZE=${SIZE:-7b}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_suite.log") 2>&1
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  want=$(ls .whl/ml_collections-*.whl)
  $PY -c "import flax, sys; sys.exit(not flax.__version__.startswith('0.12.'))" 2>/dev/null \
    || want="$want $(ls .whl/flax-*.whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $want \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null || true
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
part() {  # part NAME SECONDS CMD...: one benchmark under its own time limit
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "== $name rc=$? in $((SECONDS - t0)) s"
}
# Training step: batch 4 x 640 tokens (576 image + 64 text), bf16 params and AdamW state. First without
# remat (MFU counts no recomputation; XLA CPU's memory analysis of the 7B step: 132 GB without, 96 GB with
# remat, where the H200 reported 57.6 GB with remat), then with remat per layer if that found no room
# (~100 s on an H200 with remat: two children, compiles of 17 and 27 s).
part train_step 150 $PY benchmarks/train_step.py --size "$SIZE" --batches 4 --runs 3 --rounds 1 --no_torch \
    --dtype bfloat16 --peak_tflops "$PEAK_TFLOPS" --json "$OUT/train_step.json"
if ! $PY -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; sys.exit(not r)" "$OUT/train_step.json" 2>/dev/null; then
  part train_step_remat 150 $PY benchmarks/train_step.py --size "$SIZE" --batches 4 --runs 3 --rounds 1 \
      --no_torch --dtype bfloat16 --remat --peak_tflops "$PEAK_TFLOPS" --json "$OUT/train_step_remat.json"
fi
# Prefill and decoding at batch 8, where the targets are set (ms/token from generate(80) - generate(16));
# batch 1 (BATCHES=1,8) needs another ~150 s of 7B compiles.
part prefill_decode 210 $PY benchmarks/prefill_decode.py --size "$SIZE" --batches "${BATCHES:-8}" \
    --new_tokens 16,80 --runs 3 --dtype bfloat16 --no_flops --json "$OUT/prefill_decode.json"
# MQT-LLaVA: prefill at m = 64 of M = 256 visual tokens (the 7b preset's queries; tiny: 4 of 16).
counts=64,256; [ "$SIZE" = tiny ] && counts=4,16
part mqt_prefill 45 $PY benchmarks/mqt_prefill.py --size "$SIZE" --counts $counts --runs 5 --no_xla \
    --dtype bfloat16 --json "$OUT/mqt_prefill.json"
# Layer pruning: 8 of the 32 layers removed outside the visual region (tiny: 1 of 4).
k=8; [ "$SIZE" = tiny ] && k=1
part prune_prefill 75 $PY benchmarks/prune_prefill.py --size "$SIZE" --k $k --runs 5 --dtype bfloat16 \
    --json "$OUT/prune_prefill.json"
