#!/usr/bin/env bash
# Pretrain a Pythia-architecture model with latent thoughts on the Pile, on one or many GPU nodes.
# Pythia's recipe (300B tokens: 143,000 steps of 1024 x 2048 tokens, cosine to 10% after 1% warmup),
# as the paper compares against Pythia trained on the same data. Run on every node:
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 PRESET=pythia-1.4b N=1 \
#   DATA=data/pile_text_document TOKENIZER=tokenizer.json CKPT=ckpt/pythia-1.4b-n1 \
#   bash examples/pretrain_pythia_latent.sh [extra flags]
#
# Preemption: rerun the same command; it resumes from $CKPT (latest complete checkpoint). SIGTERM
# saves at the end of the current step. N=0 trains the vanilla baseline with the same recipe (weight
# decay 0.01 for both, as Pythia and the authors' Pythia runs). The latent settings are the
# authors' GPT-NeoX defaults (J drawn from {2,3,4}, evaluation J=3, embeddings x sqrt(2.5 H), their
# init); the run prints them in its first lines.
# Checkpoints follow Pythia's public schedule (step 0, the log-spaced steps 1, 2, 4, ..., 512, then
# every 1,000 steps to 143,000), so every Pythia checkpoint has a latent one at the same step to
# compare with. All are kept by default (at 1.4B parameters with Adam state, about 20 GB each, 3 TB
# in all). KEEP=K keeps the newest K, the log-spaced ones and, with RETAIN=R, every multiple of R
# (KEEP=2 RETAIN=10000: about 20 checkpoints, one per 10,000 steps).
# LAUNCHER=srun (examples/slurm_pretrain.sbatch): this script runs as one srun task per GPU and
# starts the trainer itself, without torchrun, whose agent kills its workers 30 s after it
# forwards a SIGTERM, which can be before a large model's last checkpoint is written.
set -euo pipefail
PRESET="${PRESET:-pythia-1.4b}"
N="${N:-1}"
TP="${TP:-1}"
PP="${PP:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
: "${DATA:?set DATA to the indexed dataset prefix (tools/preprocess_data.py output)}"
: "${TOKENIZER:?set TOKENIZER to the GPT-NeoX-20B tokenizer.json}"
: "${CKPT:?set CKPT to the checkpoint directory}"
LATENT=(--num-latent-thoughts "$N")
# Pythia's checkpoint steps: 0 and 1, 2, 4, ..., 512 here, every 1,000 by --save-interval.
SCHEDULE=(--save-interval 1000 --extra-save-iters 0 1 2 4 8 16 32 64 128 256 512)
if [ -n "${KEEP:-}" ]; then
    SCHEDULE+=(--keep-last-n-checkpoints "$KEEP")
fi
if [ -n "${RETAIN:-}" ]; then
    SCHEDULE+=(--save-retain-interval "$RETAIN")
fi

if [ "${LAUNCHER:-torchrun}" = srun ]; then
    export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
    export MASTER_ADDR="${MASTER_ADDR:?}" MASTER_PORT="${MASTER_PORT:-29500}"
    LAUNCH=("${PYTHON:-python}" -m megatron_latent.pretrain)
else
    LAUNCH=(torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$GPUS_PER_NODE"
            --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}" -m megatron_latent.pretrain)
fi

exec "${LAUNCH[@]}" \
    --model-preset "$PRESET" "${LATENT[@]}" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --bf16 --use-distributed-optimizer --recompute-granularity selective \
    --seq-length 2048 --micro-batch-size "${MBS:-4}" --global-batch-size 1024 --train-iters 143000 \
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01 \
    --weight-decay 0.01 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    --data-path "$DATA" --split 969,30,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --data-cache-path "$CKPT/data-cache" --num-workers 2 \
    --eval-interval 1000 --eval-iters 10 --log-interval 10 --tensorboard-dir "$CKPT/logs" \
    --save "$CKPT" --load "$CKPT" "${SCHEDULE[@]}" --exit-signal-handler "$@"
