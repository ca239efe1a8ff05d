#!/usr/bin/env bash
# GPU smoke and speed check (one GPU, a few minutes): the driver in bf16 at 410M, vanilla,
# latent (N=1, J in {2,3}) and the baselines (pause, loop, interpolated), printing tokens/s and MFU, then the latent-vs-vanilla step-time ratios
# against the FLOP ratios, and (when its files travel, see the end) the step beside the authors' code.
# Numbers go to docs/benchmarks.md with this command.
#   bash examples/gpu_smoke.sh 2>&1 | tee gpu_smoke.log
# On a GPU machine without network whose python3 has torch but not megatron-core (the lent H200:
# Python 3.12), bring megatron-core as a wheel and put it and this checkout on the path, so that
# tools/setup_env.sh reuses that interpreter and installs nothing:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1          # here, with network
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl  # there
#   PYTHONPATH=/tmp/site:$PWD bash examples/gpu_smoke.sh 2>&1 | tee gpu_smoke.log
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
timeout 180 "$PY" tools/bench_latent.py --num-layers 12 --hidden-size 1024 --num-attention-heads 16 \
    --vocab-size 50304 --seq-length 1024 --micro-batch-size 4 --iters 5 --bf16 2>&1 | grep -v -i warn | tail -6

# The authors' code beside ours in bf16 (issue 14 item 5, about 2 minutes), when their modeling file
# and transformers 4.46 (their file needs it; the GPU image has 5.x) travel in .whl_hf446/:
#   mkdir -p .whl_hf446 && cp PonderLM-2/src/llamafactory/model/modeling/modeling_gpt_neox.py .whl_hf446/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl_hf446 transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5
# and carry .whl_hf446 (device `carry`).
if [ -f .whl_hf446/modeling_gpt_neox.py ]; then
    echo "== against the authors' code: bf16, Pythia-410M shape, N=1 J=3"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/hf446 .whl_hf446/*.whl
    printf '#!/bin/sh\nPYTHONPATH=/tmp/hf446${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$PY" > /tmp/py446
    chmod +x /tmp/py446
    timeout 240 "$PY" tools/bench_reference.py --authors-modeling-file .whl_hf446/modeling_gpt_neox.py \
        --reference-python /tmp/py446 --device cuda --bf16 --num-layers 24 --hidden-size 1024 \
        --num-attention-heads 16 --vocab-size 50304 --seq-length 2048 --micro-batch-size 4 --rounds 5 2>&1 \
        | grep -v -i warn | tail -7
fi
