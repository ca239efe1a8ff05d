# Sourced by tests/run.sh and examples/quickstart.sh: pick or build a Python environment with
# torch, megatron-core 0.16.1 and this package, and export PY pointing at its interpreter.
#
# An interpreter that already has torch and megatron-core 0.16.1 (${PYTHON:-python3}) is reused;
# otherwise a virtual environment is made in .venv. torch is pinned to 2.13.0 there: on our CPU
# machines that resolves to the local CPU wheel, while an unpinned `torch` would pull a multi-GB
# CUDA build. GPU users install the torch of their CUDA stack first (or use the Dockerfile).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, megatron.core as m; assert m.__version__ == '0.16.1'" >/dev/null 2>&1; then
    if [ ! -x "$_root/.venv/bin/python" ]; then
        echo "[setup] creating $_root/.venv" >&2
        "$PY" -m venv "$_root/.venv"
    fi
    PY="$_root/.venv/bin/python"
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] installing torch==2.13.0" >&2
        "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
fi
_extras="${SETUP_EXTRAS:-test}"
if ! "$PY" -c "import megatron_latent, pytest, transformers, psutil, matplotlib, wandb" >/dev/null 2>&1 \
        || [ "$("$PY" -c 'import megatron_latent, os; print(os.path.dirname(os.path.dirname(megatron_latent.__file__)))' 2>/dev/null)" != "$_root" ]; then
    echo "[setup] installing megatron-latent[$_extras] (editable) and its dependencies" >&2
    "$PY" -m pip install -q --disable-pip-version-check -e "$_root[$_extras]"
fi
export PY
