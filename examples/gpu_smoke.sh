#!/usr/bin/env bash
# GPU smoke and speed check (one GPU, a few minutes): the driver in bf16 at 410M, vanilla,
# latent (N=1, J in {2,3}) and the baselines (pause, loop, interpolated), printing tokens/s and MFU,
# then the latent-vs-vanilla step-time ratios against the FLOP ratios, and (optional, see the end)
# the step beside the authors' code.
#   bash examples/gpu_smoke.sh 2>&1 | tee gpu_smoke.log
# The Python in use (${PYTHON:-python3}) needs a CUDA torch and megatron-core 0.16.1: tools/setup_env.sh
# reuses it and installs only this package when it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
source tools/setup_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)"
run() {
    timeout 240 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m megatron_latent.pretrain \
        --mock-data --model-preset "${PRESET:-pythia-410m}" --bf16 --seq-length 2048 --micro-batch-size 4 \
        --global-batch-size 16 --train-iters 12 --log-interval 4 --eval-iters 0 --num-workers 1 "$@" 2>&1 \
        | grep -E "^(model|iteration|error)|Error" | tail -5
}
echo "== vanilla (N=0)";              run
echo "== latent N=1, J in {2,3} (LLaMA defaults)";    run --num-latent-thoughts 1
echo "== latent N=1, selective recompute"; run --num-latent-thoughts 1 --recompute-granularity selective
# The paper's baselines (docs/baselines.md): their tokens/s and MFU beside latent thoughts'.
echo "== pause K=3";                  run --num-pause-tokens 3
echo "== loop K=3";                   run --num-extra-loops 3
echo "== interpolated N=1";           run --num-latent-thoughts 1 --thought-input interpolated
echo "== step-time ratios vs FLOP ratios"
timeout 180 "$PY" benchmarks/bench_latent.py --num-layers 12 --hidden-size 1024 --num-attention-heads 16 \
    --vocab-size 50304 --seq-length 1024 --micro-batch-size 4 --iters 5 --bf16 2>&1 | grep -v -i warn | tail -6

# The authors' code beside ours in bf16 (about 2 minutes): set AUTHORS_MODELING_FILE to their
# PonderLM-2/src/llamafactory/model/modeling/modeling_gpt_neox.py and REFERENCE_PYTHON to a Python
# with a CUDA torch and transformers 4.46.x (their file needs it).
if [ -n "${AUTHORS_MODELING_FILE:-}" ] && [ -n "${REFERENCE_PYTHON:-}" ]; then
    echo "== against the authors' code: bf16, Pythia-410M shape, N=1 J=3"
    timeout 240 "$PY" benchmarks/bench_reference.py --authors-modeling-file "$AUTHORS_MODELING_FILE" \
        --reference-python "$REFERENCE_PYTHON" --device cuda --bf16 --num-layers 24 --hidden-size 1024 \
        --num-attention-heads 16 --vocab-size 50304 --seq-length 2048 --micro-batch-size 4 --rounds 5 2>&1 \
        | grep -v -i warn | tail -7
fi
