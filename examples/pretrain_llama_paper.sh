#!/usr/bin/env bash
# The paper's LLaMA comparison (its Table 3 setting, after the authors' scripts/train_*_llama_1_4b.sh):
# LLaMA 1.4B (d=2048, 24 layers, 32 heads, ffn 5504), AdamW (0.9, 0.95), lr 2e-4 cosine to 10%,
# 2% warmup, 256 x 2048 tokens per step. METHOD picks the run, everything else held equal:
#
#   METHOD=latent   N=1 latent thought (J from {2,3}, evaluation J=3, scaled embeddings, the
#                   authors' init), weight decay 0.1, as their PonderLM-2 script;
#   METHOD=vanilla  N=0 with the stock Hugging Face init (normal, std 0.02) and weight decay 0.01,
#                   as their vanilla baseline (the stock LlamaForCausalLM);
#   METHOD=vanilla-paper-init   N=0 with the latent model's init and weight decay 0.1: the twin
#                   that differs from METHOD=latent in the thoughts only;
#   METHOD=ponderlm PonderLM, K=3 pondering steps (4 forwards, each next input the token embedding
#                   plus the output softmax's mix of the embeddings x sqrt(H)), weight decay 0.01,
#                   as their train_ponderlm_llama_1_4b.sh;
#   METHOD=pause / METHOD=loop   3 pause tokens / 3 extra loops, weight decay 0.1, as their
#                   train_pause_llama_1_4b.sh / train_loop_llama_1_4b.sh.
#
#   METHOD=latent DATA=data/pile_text_document TOKENIZER=tokenizer.json CKPT=ckpt/llama-1.4b-latent \
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_llama_paper.sh [extra flags]
set -euo pipefail
METHOD="${METHOD:-latent}"
: "${DATA:?set DATA to the indexed dataset prefix (tools/preprocess_data.py output)}"
: "${TOKENIZER:?set TOKENIZER to the GPT-NeoX-20B tokenizer.json}"
: "${CKPT:?set CKPT to the checkpoint directory}"
case "$METHOD" in
    latent) RUN=(--num-latent-thoughts 1 --weight-decay 0.1) ;;
    vanilla) RUN=(--init-style hf --init-method-std 0.02 --weight-decay 0.01) ;;
    vanilla-paper-init) RUN=(--weight-decay 0.1) ;;
    ponderlm) RUN=(--num-ponder-steps 3 --weight-decay 0.01) ;;
    pause) RUN=(--num-pause-tokens 3 --weight-decay 0.1) ;;
    loop) RUN=(--num-extra-loops 3 --weight-decay 0.1) ;;
    *) echo "error: METHOD=$METHOD: one of latent, vanilla, vanilla-paper-init, ponderlm, pause, loop" >&2; exit 2 ;;
esac
exec torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
    --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-29500}" -m megatron_latent.pretrain \
    --model-preset llama-1.4b "${RUN[@]}" \
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
    --bf16 --use-distributed-optimizer --recompute-granularity selective \
    --seq-length 2048 --micro-batch-size "${MBS:-4}" --global-batch-size 256 --train-iters "${ITERS:-50000}" \
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-fraction 0.02 \
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 \
    --data-path "$DATA" --split 969,30,1 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --data-cache-path "$CKPT/data-cache" --num-workers 2 \
    --eval-interval 1000 --eval-iters 10 --log-interval 10 --tensorboard-dir "$CKPT/logs" \
    --save "$CKPT" --load "$CKPT" --save-interval 1000 --exit-signal-handler "$@"
