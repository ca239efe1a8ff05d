"""Every method's forward against the authors' own modeling files, on the same weights.

For LLaMA and GPT-NeoX, tiny models of each method (pause tokens K=2, extra loops K=2, interpolated
thoughts N=1 with the full softmax and top-7, latent thoughts N=1, PonderLM K=1 and K=3, on LLaMA also
with the residual mix) get the same random weights; ours
computes its logits and exports a Hugging Face folder; then a worker under another interpreter
(their files need transformers 4.46.x) loads the folder's weights into the authors' class for that
method (`src/llamafactory/model/modeling/` of LUMIA-Group/PonderLM-2: modeling_llama_pause.py,
modeling_llama_loop.py, modeling_llama.py, modeling_llama_orin.py, modeling_gpt_neox_addpausetoken.py,
modeling_gpt_neox_addhidden_weightshare.py, modeling_gpt_neox.py, modeling_gpt_neox_addhidden.py) with
their config keys (their PonderLM script's for pondering: --interpolation true --num_latent_thoughts K), and
computes theirs. Printed: |theirs - ours| / max |ours| per case, beside how far the method moves
the logits from the same weights' vanilla forward (so a match is not a match of two vanilla runs).

    git clone https://github.com/LUMIA-Group/PonderLM-2
    python -m venv hf446 && hf446/bin/pip install torch "transformers==4.46.3"
    python benchmarks/check_authors_methods.py --authors-repo PonderLM-2 --reference-python hf446/bin/python

Exit status 1 when a case differs by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# method -> (our ModelConfig fields, their config keys, their file per family)
CASES = {
    "pause": (dict(num_pause_tokens=2), dict(num_latent_thoughts=2),
              {"llama": "modeling_llama_pause", "gpt-neox": "modeling_gpt_neox_addpausetoken"}),
    "loop": (dict(num_extra_loops=2), dict(num_latent_thoughts=2),
             {"llama": "modeling_llama_loop", "gpt-neox": "modeling_gpt_neox_addhidden_weightshare"}),
    "interpolated": (dict(num_latent_thoughts=1, thought_input="interpolated"),
                     dict(num_latent_thoughts=1, interpolation=True, interpolation_use_topk=False),
                     {"llama": "modeling_llama", "gpt-neox": "modeling_gpt_neox"}),
    "interpolated-top7": (dict(num_latent_thoughts=1, thought_input="interpolated", interpolation_topk=7),
                          dict(num_latent_thoughts=1, interpolation=True, interpolation_use_topk=True,
                               interpolation_topk=7),
                          {"llama": "modeling_llama", "gpt-neox": "modeling_gpt_neox"}),
    "latent": (dict(num_latent_thoughts=1), dict(num_latent_thoughts=1, interpolation=False),
               {"llama": "modeling_llama", "gpt-neox": "modeling_gpt_neox"}),
}
# PonderLM (their --patch_method ponderlm): each family's own feedback and embedding scale; the
# residual mix (their residual_interpolated_embeds) exists in the LLaMA file only.
_PONDER_FILES = {"llama": "modeling_llama_orin", "gpt-neox": "modeling_gpt_neox_addhidden"}
for _k in (1, 3):
    CASES[f"ponder-k{_k}"] = (dict(num_ponder_steps=_k, scale_embeddings=None),
                              dict(num_latent_thoughts=_k, interpolation=True), _PONDER_FILES)
    CASES[f"ponder-k{_k}-residual"] = (dict(num_ponder_steps=_k, ponder_residual=True),
                                       dict(num_latent_thoughts=_k, interpolation=True,
                                            residual_interpolated_embeds=True),
                                       {"llama": _PONDER_FILES["llama"]})
PRESETS = {"llama": "tiny-llama", "gpt-neox": "tiny-pythia"}
JACOBI = 3  # the evaluation J on both sides (their num_jacobi_iterations)


# ---------------------------------------------------------------------------------- our side
def ours(out: str, length: int) -> dict:
    """Export every case under `out`; returns {case: max |logit|} and writes ours.pt there."""
    import torch
    from megatron.core import tensor_parallel

    from megatron_latent.checkpoint_layout import write_model_config
    from megatron_latent.config import get_preset
    from megatron_latent.hf.export import export_to_hf
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel
    from megatron_latent.parallel.initialize import initialize_single_process
    from megatron_latent.training.checkpointing import save_checkpoint

    initialize_single_process("check_authors_methods")
    tokens = torch.randint(0, 200, (2, length), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length).expand_as(tokens)
    logits = {"ids": tokens}
    for arch, preset in PRESETS.items():
        for name, (fields, _, files) in CASES.items():
            if arch not in files:
                continue
            # Large weights (HF init, std 0.2): every slot visibly moves the logits.
            cfg = get_preset(preset).replace(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                             vocab_size=250, seq_length=64, init_method_std=0.2,
                                             **{"scale_embeddings": True, **fields})
            torch.manual_seed(1)
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            model = build_gpt_model(cfg, parallel_output=False, model_cls=LatentGPTModel).eval()
            root = os.path.join(out, f"{arch}-{name}")
            save_checkpoint(os.path.join(root, "ckpt"), 0, [model])
            write_model_config(cfg, os.path.join(root, "ckpt"))
            export_to_hf(os.path.join(root, "ckpt"), os.path.join(root, "hf"))
            # The same weights' vanilla forward (the padded vocabulary is the same size here).
            vanilla = cfg.replace(num_latent_thoughts=0, num_pause_tokens=0, num_extra_loops=0, num_ponder_steps=0)
            plain = build_gpt_model(vanilla, parallel_output=False, model_cls=LatentGPTModel).eval()
            plain.load_state_dict(model.state_dict())
            rows = vanilla.embedding_rows
            with torch.no_grad():
                got = model(tokens, pos, None, num_jacobi_iters=JACOBI)[..., : cfg.embedding_rows]
                base = plain(tokens, pos, None)[..., :rows]
            logits[f"{arch}-{name}"] = got
            logits[f"{arch}-{name}-moves"] = ((got[..., :rows] - base).abs().max() / got.abs().max()).item()
    torch.save(logits, os.path.join(out, "ours.pt"))
    return logits


# ------------------------------------------------------------------------------ their side
def worker(repo: str, out: str) -> None:
    """Under the reference interpreter: their logits per case, one JSON line each."""
    import importlib.util

    import torch
    import transformers
    from safetensors.torch import load_file

    want = torch.load(os.path.join(out, "ours.pt"))
    tokens = want["ids"]
    for arch in PRESETS:
        for name, (_, keys, files) in CASES.items():
            if arch not in files:
                continue
            folder = os.path.join(out, f"{arch}-{name}", "hf")
            with open(os.path.join(folder, "config.json")) as f:
                conf = json.load(f)
            for k in ("auto_map", "architectures", "model_type"):
                conf.pop(k, None)
            conf.update(keys, recurrent_model=True, scale_embeds=True, use_cache=False,
                        num_jacobi_iterations=JACOBI, random_jacobi_iterations=False)
            config = (transformers.LlamaConfig if arch == "llama" else transformers.GPTNeoXConfig)(**conf)
            config._attn_implementation = "eager"
            path = os.path.join(repo, "src/llamafactory/model/modeling", files[arch] + ".py")
            spec = importlib.util.spec_from_file_location(files[arch], path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            cls = mod.LlamaForCausalLM if arch == "llama" else mod.GPTNeoXForCausalLM
            model = cls(config).float().eval()
            missing, unexpected = model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")),
                                                        strict=False)
            missing = [k for k in missing if "rotary" not in k and "inv_freq" not in k and "masked_bias" not in k]
            with torch.no_grad():
                theirs = model(input_ids=tokens).logits
            ref = want[f"{arch}-{name}"]
            err = ((theirs - ref).abs().max() / ref.abs().max()).item() if theirs.shape == ref.shape else float("inf")
            print(json.dumps(dict(arch=arch, method=name, file=files[arch], error=err, missing=missing,
                                  unexpected=list(unexpected), moves=want[f"{arch}-{name}-moves"])), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--authors-repo", required=True, help="a clone of LUMIA-Group/PonderLM-2")
    p.add_argument("--reference-python", required=True, help="a Python with torch and transformers 4.46.x")
    p.add_argument("--out", default=None, help="where the folders go (default: a temporary directory)")
    p.add_argument("--seq-length", type=int, default=8)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="check_authors_methods_")
    if args.worker:
        worker(args.authors_repo, out)
        return 0
    if not os.path.isdir(os.path.join(args.authors_repo, "src/llamafactory/model/modeling")):
        p.error(f"--authors-repo {args.authors_repo}: no src/llamafactory/model/modeling (a PonderLM-2 clone?)")
    ours(out, args.seq_length)
    run = subprocess.run([args.reference_python, os.path.abspath(__file__), "--worker", "--out", out,
                          "--authors-repo", args.authors_repo, "--reference-python", args.reference_python],
                         capture_output=True, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr)
        return run.returncode
    worst = 0.0
    print(f"{'family':9s} {'method':18s} {'their file':42s} {'|theirs-ours|/max':>18s} {'method moves':>13s}")
    for line in run.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        worst = max(worst, r["error"])
        extra = f"  missing {r['missing']} unexpected {r['unexpected']}" if r["missing"] or r["unexpected"] else ""
        print(f"{r['arch']:9s} {r['method']:18s} {r['file']:42s} {r['error']:18.2e} {r['moves']:13.2f}{extra}")
    print(f"worst {worst:.2e} (tolerance {args.tolerance:g})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
