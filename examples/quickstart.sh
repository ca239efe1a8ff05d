#!/usr/bin/env bash
# Set up the environment (as tests/run.sh does), then train a tiny latent-thought LLaMA (N=1, J drawn
# from {2,3} per step) on CPU with tensor parallelism over 2 processes: loss per step, a validation
# loss, a checkpoint in $OUT/ckpt and metrics in $OUT/logs/metrics.jsonl. Extra flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
OUT="${OUT:-/tmp/megatron-latent-quickstart}"
rm -rf "$OUT"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_latent.pretrain \
    --mock-data --model-preset tiny-llama --tensor-model-parallel-size 2 --seq-length 64 \
    --num-latent-thoughts 1 \
    --micro-batch-size 4 --global-batch-size 16 --train-iters 20 --lr 3e-3 --lr-warmup-iters 2 \
    --eval-interval 10 --eval-iters 2 --num-workers 0 \
    --save "$OUT/ckpt" --save-interval 10 --tensorboard-dir "$OUT/logs" "$@"
