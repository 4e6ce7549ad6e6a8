#!/usr/bin/env bash
# The drafter pipeline on one CUDA machine, as one prepared command: more on-policy data from
# the committed token file, the target cache, then DSpark, DFlash, EAGLE-3 and MTP trained for
# the same wall time each, checkpoints and logs under OUT (e.g. the device tool's $OUT).
#
#   bash draft/training/gpu_pipeline.sh OUT MODEL [MINUTES_PER_DRAFTER] [RESPONSE_TOKENS]
#
# MODEL: the target (the default SmolLM2-135M-Instruct GGUF or a Hugging Face directory); it
# must be on that machine. Python packages it lacks (the lent H200 image has no `gguf`) come as
# wheels in .whl/ (see the device tool's notes); no network is needed. Everything is resumable:
# a rerun skips finished responses, cached sequences and training steps.
set -euo pipefail
OUT=${1:?usage: gpu_pipeline.sh OUT MODEL [MINUTES_PER_DRAFTER] [RESPONSE_TOKENS]}
MODEL=${2:?the target model path}
MINUTES=${3:-8}
TOKENS=${4:-1500000}
TOKEN_FILE=draft/data/smollm2-135m.npz
WORK=${DSPARK_GPU_WORK:-/tmp/dspark-gpu}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
mkdir -p "$OUT" "$WORK"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

# 1. more responses (continuing the committed ones), then the compact file again
python3 -m draft.cli data --out "$WORK/data" --model "$MODEL" --batch-size 256 \
    --max-response-tokens "$TOKENS" --pack "$TOKEN_FILE"
cp "$TOKEN_FILE" "$OUT/"
# 2. the target cache: one prefill pass over every sequence
python3 -m draft.cli cache --tokens "$TOKEN_FILE" --data "$WORK/data" --model "$MODEL" --batch-size 256
# 3. equal wall time per drafter; the step budget only shapes the schedule
COMMON="--data $WORK/data --model $MODEL --device cuda --batch-blocks 2048 --anchors-per-seq 64 \
    --lr 6e-4 --warmup 100 --kl-warmup 300 --fc-pass-last --save-every 200 --log-every 20 \
    --max-minutes $MINUTES"
for name in dspark dflash eagle3 mtp; do
    python3 -m draft.cli train --out "$WORK/ckpt/$name" --draft "$name" --steps 4000 $COMMON
    mkdir -p "$OUT/$name"
    cp "$WORK/ckpt/$name"/{config.json,model.safetensors,train_log.jsonl} "$OUT/$name/"
done
python3 -m draft.cli calibrate --data "$WORK/data" --draft "$OUT/dspark" --model "$MODEL" \
    --out "$OUT/dspark_calibration.json"
