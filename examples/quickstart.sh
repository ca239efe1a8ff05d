#!/usr/bin/env bash
# Set up the environment (as tests/run.sh does), then train a tiny latent-thought GPT (N=1, J drawn
# from {2,3} per step) for a few steps on CPU with tensor parallelism over 2 processes, printing
# the loss of every step.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m megatron_latent.pretrain \
    --mock-data --tensor-model-parallel-size 2 \
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --vocab-size 128 \
    --num-latent-thoughts 1 --jacobi-iters 2 3 --scale-embeddings \
    --micro-batch-size 4 --global-batch-size 16 --train-iters 20 --lr 3e-3 "$@"
