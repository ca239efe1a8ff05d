"""Exports load the same under the oldest transformers setup.py admits (4.46.3): folders written
here (transformers 5) are loaded in a separate plain venv with the stock classes (N=0) and our
remote code (N=1; extra loops per family, pause tokens, interpolated thoughts), and give the
logits this venv's megatron model computes; generate() there gives the tokens it gives here.
The venv is built once (pip, PyPI) and cached."""

import json
import os
import subprocess
import textwrap
import venv

import pytest
import torch

from tiny import ARCHS, ids, latent_model, megatron_logits, save, small_config

OLDEST = "4.46.3"
PACKAGES = ["torch==2.13.0", f"transformers=={OLDEST}", "safetensors"]
# Not the 4.46 defaults (rotary_pct 0.25, base 10000), so a key the old version misses shows.
ROPE = {"gpt-neox": dict(rotary_percent=0.5, rotary_base=20000.0), "llama": dict(rotary_base=5000.0), "gpt2": {}}


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "megatron_latent", "hf" + OLDEST.replace(".", ""))


def _oldest_python() -> str:
    """The cached venv's python (a plain venv: the main venv's transformers 5 must not leak in)."""
    d = _cache_dir()
    py = os.path.join(d, "bin", "python")
    marker = os.path.join(d, ".complete-" + "-".join(PACKAGES).replace("=", ""))
    if os.path.exists(marker):
        return py
    venv.EnvBuilder(with_pip=True, clear=True).create(d)
    proc = subprocess.run([py, "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if any(s in text for s in ("NewConnectionError", "Network is unreachable", "Temporary failure in name")):
            pytest.skip(f"pip cannot reach the package index: {text.strip().splitlines()[-1]}")
        raise RuntimeError(f"pip install {' '.join(PACKAGES)} failed:\n{text}")
    open(marker, "w").close()
    return py


_OLD_SIDE = textwrap.dedent("""
    import json, sys, torch, transformers
    assert transformers.__version__ == sys.argv[2], transformers.__version__
    jobs = json.load(open(sys.argv[1]))
    x = torch.load(jobs["ids"])
    out = {}
    for name, job in jobs["folders"].items():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            job["path"], trust_remote_code=job["latent"], attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(x).logits
            gen = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        out[name] = {"class": type(model).__name__, "logits": logits, "generate": gen}
    torch.save(out, jobs["out"])
""")


@pytest.mark.slow
def test_exports_load_the_same_under_transformers_4_46(tmp_path, single_rank):
    import transformers

    from megatron_latent.hf.export import export_to_hf

    py = _oldest_python()
    x = ids()
    want, folders = {}, {}
    cases = [(arch, n, {}) for arch in ARCHS for n in (0, 1)] + [
        (arch, 0, dict(num_extra_loops=2, scale_embeddings=True)) for arch in ARCHS] + [
        ("gpt-neox", 0, dict(num_pause_tokens=2, scale_embeddings=True)),
        ("llama", 1, dict(thought_input="interpolated", interpolation_topk=5))]
    for arch, n, method in cases:
        cfg = small_config(arch, n, **ROPE[arch], **method)
        model = latent_model(cfg)
        name = f"{arch}-{cfg.latent.method}-{n}"
        save(model, cfg, str(tmp_path / f"ckpt-{name}"))
        path = str(tmp_path / f"hf-{name}")
        export_to_hf(str(tmp_path / f"ckpt-{name}"), path)
        remote = cfg.latent.method != "vanilla"
        here = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote).eval()
        with torch.no_grad():
            gen = here.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        want[name] = (megatron_logits(model, x), gen)
        folders[name] = {"path": path, "latent": remote}
    torch.save(x, tmp_path / "ids.pt")
    jobs = {"ids": str(tmp_path / "ids.pt"), "out": str(tmp_path / "old.pt"), "folders": folders}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "old_side.py").write_text(_OLD_SIDE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([py, str(tmp_path / "old_side.py"), str(tmp_path / "jobs.json"), OLDEST],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "old.pt")
    for name, (logits, gen) in want.items():
        old = got[name]
        err = (old["logits"][..., :logits.shape[-1]] - logits).abs().max().item()
        print(f"\n{name}: transformers {OLDEST} {old['class']}: |logits - megatron| {err:.1e}")
        assert old["class"].startswith("Latent") == ("vanilla" not in name), (name, old["class"])
        assert err < 1e-5, name
        assert torch.equal(old["generate"], gen), name
