"""A cached plain venv with the oldest transformers setup.py admits (4.46.3), for the slow export
compatibility test. Not --system-site-packages: the main venv's transformers 5 must not leak in."""

from __future__ import annotations

import os
import subprocess
import sys
import venv

OLDEST = "4.46.3"
PACKAGES = ["torch==2.13.0", f"transformers=={OLDEST}", "safetensors"]


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "megatron_latent", "hf" + OLDEST.replace(".", ""))


class PipUnreachable(RuntimeError):
    pass


def oldest_python() -> str:
    """The venv's python; built once (pip from PyPI), then reused. A finished venv carries a marker."""
    d = cache_dir()
    py = os.path.join(d, "bin", "python")
    marker = os.path.join(d, ".complete-" + "-".join(PACKAGES).replace("=", ""))
    if os.path.exists(marker):
        return py
    venv.EnvBuilder(with_pip=True, clear=True).create(d)
    proc = subprocess.run([py, "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if any(s in text for s in ("Could not find a version", "Connection", "NewConnectionError", "Network")):
            raise PipUnreachable(text.strip().splitlines()[-1])
        raise RuntimeError(f"pip install {' '.join(PACKAGES)} failed:\n{text}")
    open(marker, "w").close()
    return py


if __name__ == "__main__":
    print(oldest_python(), file=sys.stderr)
