#!/usr/bin/env bash
# The paper's comparison at small scale, on any indexed dataset (tools/preprocess_data.py output):
# at equal training tokens, with the authors' hyper-parameters per method, two seeds each:
#
#   vanilla-S-hf-init      N=0, S layers, the stock HF init (std 0.02), weight decay 0.01 (the authors' baseline)
#   vanilla-S-paper-init   N=0, S layers, the latent model's init, weight decay 0.01
#   vanilla-2S-hf-init     N=0, 2S layers (equal inference cost to N=1), HF init, weight decay 0.01
#   vanilla-2S-paper-init  N=0, 2S layers, the latent model's init, weight decay 0.01
#   latent-N1, latent-N2   N=1 and N=2 latent thoughts, S layers, the paper's init, weight decay 0.1
#   pause-K3               3 pause tokens per token (docs/baselines.md), weight decay 0.1
#   loop-K3                the layer stack run 4 times, weight decay 0.1
#   ponderlm-K3            PonderLM (the paper's row): 4 forwards, each next input the token embedding plus
#                          the output softmax's mix of the embeddings, weight decay 0.01 (the authors' script)
#   interpolated-N1        PonderLM-2 with interpolated thoughts: N=1 thoughts fed the softmax mix of the
#                          embeddings instead of the hidden state: latent-N1's exact compute; weight decay 0.01
#
# Then one table
# (tools/compare_runs.py: parameters, tokens, exact FLOPs, validation loss with the spread over the
# seeds, wall time) and one PNG.
#
#   bash examples/reproduce_small.sh --data-path DATA_text_document --tokenizer-model tokenizer.json \
#        [--tiny] [--out DIR] [--seeds "1 2"] [--train-iters N]
#
# --tiny: LLaMA 4 layers x 64, 128-token sequences, 200 steps of 16 (2 CPU cores). Without it:
# LLaMA 12 layers x 768 (llama-125m), 1024-token sequences, 2000 steps of 64 sequences, meant for
# one GPU (not yet timed). A rerun skips finished runs and resumes cut ones.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/megatron-latent-reproduce}" DATA="" TOKENIZER="" TINY=0 SEEDS="1 2" ITERS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --data-path) DATA="$(realpath "$2")"; shift 2 ;;
        --tokenizer-model) TOKENIZER="$(realpath "$2")"; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --seeds) SEEDS="$2"; shift 2 ;;
        --train-iters) ITERS="$2"; shift 2 ;;
        *) echo "error: unknown flag $1 (flags: --data-path PREFIX, --tokenizer-model FILE, --tiny, --out DIR," \
                "--seeds \"1 2\", --train-iters N)" >&2; exit 2 ;;
    esac
done
[ -n "$DATA" ] && [ -f "$DATA.idx" ] || { echo "error: --data-path: no $DATA.idx (an indexed dataset prefix)" >&2; exit 2; }
[ -n "$TOKENIZER" ] && [ -f "$TOKENIZER" ] || { echo "error: --tokenizer-model: no such file '$TOKENIZER'" >&2; exit 2; }
source tools/setup_env.sh
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"
mkdir -p "$OUT/runs"
OUT="$(realpath "$OUT")"
if [ "$TINY" = 1 ]; then
    S=4; ITERS="${ITERS:-200}"
    SIZE=(--model-preset tiny-llama --seq-length 128 --max-position-embeddings 128 --micro-batch-size 16
          --global-batch-size 16 --lr 3e-3 --min-lr 3e-4 --eval-interval 20 --num-workers 0)
else
    S=12; ITERS="${ITERS:-2000}"
    SIZE=(--model-preset llama-125m --seq-length 1024 --max-position-embeddings 1024 --micro-batch-size 8
          --global-batch-size 64 --lr 6e-4 --min-lr 6e-5 --eval-interval 100 --bf16 --num-workers 2)
fi
COMMON=("${SIZE[@]}" --data-path "$DATA" --split 95,5,0 --tokenizer-type HuggingFaceTokenizer
        --tokenizer-model "$TOKENIZER" --train-iters "$ITERS" --lr-warmup-fraction 0.02 --eval-iters 4
        --log-interval 10)

declare -A FLAGS=(
    [vanilla-S-hf-init]="--num-latent-thoughts 0 --init-style hf --init-method-std 0.02 --weight-decay 0.01"
    [vanilla-S-paper-init]="--num-latent-thoughts 0 --weight-decay 0.01"
    [vanilla-2S-hf-init]="--num-latent-thoughts 0 --num-layers $((2 * S)) --init-style hf --init-method-std 0.02 --weight-decay 0.01"
    [vanilla-2S-paper-init]="--num-latent-thoughts 0 --num-layers $((2 * S)) --weight-decay 0.01"
    [latent-N1]="--num-latent-thoughts 1 --weight-decay 0.1"
    [latent-N2]="--num-latent-thoughts 2 --weight-decay 0.1"
    [pause-K3]="--num-pause-tokens 3 --weight-decay 0.1"
    [loop-K3]="--num-extra-loops 3 --weight-decay 0.1"
    [ponderlm-K3]="--num-ponder-steps 3 --weight-decay 0.01"
    [interpolated-N1]="--num-latent-thoughts 1 --thought-input interpolated --weight-decay 0.01"
)
ORDER=(vanilla-S-hf-init vanilla-S-paper-init vanilla-2S-hf-init vanilla-2S-paper-init latent-N1 latent-N2
       pause-K3 loop-K3 ponderlm-K3 interpolated-N1)

DIRS=() LABELS=()
for name in "${ORDER[@]}"; do
    for seed in $SEEDS; do
        dir="$OUT/runs/$name-seed$seed"
        DIRS+=("$dir"); LABELS+=("$name")
        if [ "$(cat "$dir/ckpt/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$ITERS" ]; then
            echo "== $name seed $seed: finished already"
            continue
        fi
        echo "== $name seed $seed: ${FLAGS[$name]}"
        # shellcheck disable=SC2086  # FLAGS holds several flags
        "$PY" -m megatron_latent.pretrain "${COMMON[@]}" ${FLAGS[$name]} --seed "$seed" \
            --save "$dir/ckpt" --load "$dir/ckpt" --save-interval "$ITERS" --tensorboard-dir "$dir/logs" \
            > "$dir.log" 2>&1 || { echo "error: $name seed $seed failed: see $dir.log" >&2; exit 1; }
        grep -E "^(validation|test) at" "$dir.log" | tail -n 2
    done
done

"$PY" tools/compare_runs.py "${DIRS[@]}" --label "${LABELS[@]}" --plot "$OUT/valid_loss.png" \
    --latent latent-N1 --baselines vanilla-S-hf-init vanilla-S-paper-init vanilla-2S-hf-init vanilla-2S-paper-init \
    pause-K3 loop-K3 ponderlm-K3 interpolated-N1 \
    | tee "$OUT/comparison.md"
echo "everything is in $OUT"
