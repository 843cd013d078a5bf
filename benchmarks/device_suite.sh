#!/usr/bin/env bash
# The accelerator suite: 7B shapes in bf16 (random weights, nothing downloaded), dense vs Dynamic-LLaVA:
# the training step (with MFU against --peak_tflops), prefill and KV-cache decoding. Run it when the
# `device` tool lends a GPU, from the repository root:
#
#     OUT=/tmp/out PEAK_TFLOPS=989 bash benchmarks/device_suite.sh      # H100/H200 SXM dense bf16 peak
#
# Writes $OUT/train_step_7b.json, $OUT/prefill_decode_7b.json and $OUT/device_suite.log; each part has its
# own time limit so the whole suite ends in under 8 minutes. The machine needs this package's runtime
# dependencies (requirements.txt); where it has no network, carry a wheelhouse made beforehand with
# `pip download -r requirements.txt -d wheelhouse --python-version 3.12 --only-binary=:all:` and install
# it with `pip install --no-index --find-links wheelhouse -r requirements.txt`.
set -u
OUT=${OUT:-runs/device}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_suite.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# Training step: batch 4 x 640 tokens (576 image + 64 text), bf16 params and Adam state, remat per layer.
timeout 270 $PY benchmarks/train_step.py --size 7b --batches 4 --runs 3 --rounds 1 --no_torch \
    --dtype bfloat16 --remat --peak_tflops "$PEAK_TFLOPS" --json "$OUT/train_step_7b.json"
echo "train_step rc=$?"
# Prefill and decoding at batch 1 and 8 (ms/token from generate(80) - generate(16)).
timeout 180 $PY benchmarks/prefill_decode.py --size 7b --batches 1,8 --new_tokens 16,80 --runs 3 \
    --dtype bfloat16 --no_flops --json "$OUT/prefill_decode_7b.json"
echo "prefill_decode rc=$?"
