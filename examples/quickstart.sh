#!/usr/bin/env bash
# The offline quickstart (about 10 minutes on 2 CPU cores once the environment exists):
#   1. corpus: the installed Python standard library's docstrings and sources as Pile-style JSONL
#      (or --input FILE...), a byte-level BPE tokenizer trained on it (or --tokenizer-model
#      tokenizer.json), preprocessed with tools/preprocess_data.py;
#   2. three runs on the same tokens, same seed, same paper init formula, same schedule: vanilla
#      tiny-llama S (N=0), vanilla with twice the layers, latent N=1 of size S (J drawn from {2,3});
#   3. tools/compare_runs.py: the table (parameters, tokens, exact FLOPs, validation loss/ppl, wall
#      time) and valid_loss.png;
#   4. the latent model exported to Hugging Face; greedy continuations from the export and from
#      `python -m megatron_latent.generate` must agree (else exit status 1).
# Everything lands in $OUT (default /tmp/megatron-latent-quickstart; or --out DIR); a rerun reuses
# the finished steps (delete $OUT to start over). Flags: --input FILE..., --tokenizer-model FILE,
# --out DIR, --train-iters N.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/megatron-latent-quickstart}"
INPUT=() TOKENIZER="" ITERS=200
while [ $# -gt 0 ]; do
    case "$1" in
        --input) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do INPUT+=("$(realpath "$1")"); shift; done ;;
        --tokenizer-model) TOKENIZER="$(realpath "$2")"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --train-iters) ITERS="$2"; shift 2 ;;
        *) echo "error: unknown flag $1 (flags: --input FILE..., --tokenizer-model FILE, --out DIR, --train-iters N)" >&2
           exit 2 ;;
    esac
done
START=$SECONDS
source tools/setup_env.sh
# megatron-core's notices on CPU (no apex / Transformer Engine, deprecations) would bury the output.
export PYTHONWARNINGS="ignore::UserWarning,ignore::FutureWarning"
mkdir -p "$OUT/data" "$OUT/runs"
OUT="$(realpath "$OUT")"
step() { echo; echo "=== [$(( SECONDS - START ))s] $*"; }

# ------------------------------------------------------------------ data
# What the data is made of; a rerun into the same $OUT with other data refuses instead of mixing.
source_id="input=${INPUT[*]:-python-stdlib} tokenizer=${TOKENIZER:-trained}"
if [ -f "$OUT/data/source.txt" ] && [ "$(cat "$OUT/data/source.txt")" != "$source_id" ]; then
    echo "error: $OUT was built from '$(cat "$OUT/data/source.txt")', not '$source_id': use another --out" >&2
    exit 2
fi
echo "$source_id" > "$OUT/data/source.txt"
if [ ${#INPUT[@]} -eq 0 ]; then
    CORPUS=("$OUT/data/corpus.jsonl")
    step "corpus: Python standard library docstrings and sources -> ${CORPUS[0]}"
    [ -f "${CORPUS[0]}" ] || "$PY" tools/build_corpus.py --output "${CORPUS[0]}" --max-mb 4
else
    CORPUS=("${INPUT[@]}")
fi
if [ -z "$TOKENIZER" ]; then
    TOKENIZER="$OUT/data/tokenizer.json"
    step "tokenizer: byte-level BPE (2048 tokens) trained on the corpus -> $TOKENIZER"
    [ -f "$TOKENIZER" ] || "$PY" tools/build_corpus.py --input "${CORPUS[@]}" --tokenizer-output "$TOKENIZER" \
        --vocab-size 2048
fi
DATA="$OUT/data/corpus_text_document"
step "preprocessing -> $DATA"
[ -f "$DATA.idx" ] || "$PY" tools/preprocess_data.py --input "${CORPUS[@]}" --json-keys text \
    --output-prefix "$OUT/data/corpus" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
    --append-eod --workers 2 --no-progress

# ------------------------------------------------------------------ training
# The same for all three: data and order, seed, schedule, weight decay 0.1 (the paper's pretraining
# value, which the authors used for their latent runs; held equal so that only the method differs)
# and the paper's init formula (--init-method-std unset: truncated normal sqrt(2/(5H)), LLaMA output
# projections / sqrt(2L)), which gives N=0 and N=1 of size S identical initial weights.
COMMON=(--model-preset tiny-llama --seq-length 128 --max-position-embeddings 128
        --data-path "$DATA" --split 95,5,0 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
        --micro-batch-size 16 --global-batch-size 16 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
        --lr-warmup-fraction 0.05 --weight-decay 0.1 --seed 1234 --eval-interval 20 --eval-iters 2
        --log-interval 10 --num-workers 0)
train() {  # NAME FLAGS...: skipped when its checkpoint is at the last iteration; resumed when cut short
    local name="$1" dir="$OUT/runs/$1"
    shift
    step "training $name ($*)"
    if [ "$(cat "$dir/ckpt/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$ITERS" ]; then
        echo "finished already"
        return
    fi
    "$PY" -m megatron_latent.pretrain "${COMMON[@]}" "$@" --save "$dir/ckpt" --load "$dir/ckpt" \
        --save-interval 50 --tensorboard-dir "$dir/logs" 2>&1 | tee "$dir.log"
}
train vanilla --num-latent-thoughts 0
train vanilla-2x-layers --num-latent-thoughts 0 --num-layers 8
train latent-N1 --num-latent-thoughts 1

# ------------------------------------------------------------------ comparison
step "comparison -> $OUT/comparison.md, $OUT/valid_loss.png"
"$PY" tools/compare_runs.py "$OUT/runs/vanilla" "$OUT/runs/vanilla-2x-layers" "$OUT/runs/latent-N1" \
    --latent latent-N1 --baselines vanilla vanilla-2x-layers --plot "$OUT/valid_loss.png" | tee "$OUT/comparison.md"

# ------------------------------------------------------------------ export and generation
HF="$OUT/hf/latent-N1"
step "export to Hugging Face -> $HF"
[ -f "$HF/config.json" ] || "$PY" tools/convert_to_hf.py --load "$OUT/runs/latent-N1/ckpt" --save "$HF" \
    --tokenizer-model "$TOKENIZER" --force
step "greedy continuation: python -m megatron_latent.generate vs the export"
GEN="$OUT/generate.json"
if [ ! -f "$GEN" ]; then
    "$PY" -m megatron_latent.generate --load "$OUT/runs/latent-N1/ckpt" --prompt "def __init__(self, " \
        --max-new-tokens 24 --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER" \
        2> "$OUT/generate.err" | tail -n 1 > "$GEN.tmp"
    mv "$GEN.tmp" "$GEN"
fi
"$PY" tools/check_hf_continuation.py --hf-dir "$HF" --megatron-json "$GEN" --tokenizer-model "$TOKENIZER"

step "done in $(( SECONDS - START ))s: everything is in $OUT"
