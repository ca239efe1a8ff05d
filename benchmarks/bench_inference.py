"""Inference cost of a latent model (N=1) beside its vanilla twin, the equal-FLOP vanilla model of
twice the layers, and the authors' LLaMA latent generation on the same weights, with the FLOPs of
each measurement next to its time (models/flops.py), so every time ratio can be read against its
FLOP ratio; for decoding also the ratio of the bytes of weights and KV cache a step reads, which a
step bound by memory follows instead.

    python benchmarks/bench_inference.py [--model-preset llama-125m --num-layers 6 --hidden-size 512]
        [--batch-sizes 1 8 32] [--prefill-lengths 128 512 2048] [--prompt 128 --decode 32]
        [--authors-modeling-file PonderLM-2/src/llamafactory/model/modeling/modeling_llama.py
         --reference-python hf446/bin/python] [--rounds 3] [--threads 2] [--json out.json]
    python benchmarks/bench_inference.py --quick     # tiny sizes: a smoke run, not a measurement

Measured, fp32 on the CPU (random weights: speed does not depend on them), for each model:

* decode: ms per generated token (the whole batch's step) at each batch size, after a prompt of
  `--prompt` tokens, median over `--decode` greedy tokens;
* prefill: seconds to put a prompt of each length in the KV cache and give the next token's
  logits (batch `--prefill-batch-size`, default 1; the latent model's default Jacobi prefill,
  J = its evaluation J), and for the
  latent model also the exact prefill (`prefill-exact`: the sequential rollout, the vanilla
  model's FLOPs in (N+1) P single-slot steps);
* scoring: lm-evaluation-harness loglikelihood requests per second (its HFLM on the HF model, a
  local word-level tokenizer, `--requests` random requests of about `--prompt` tokens).

Paths: `hf` is the HF model with the remote code an export ships (megatron_latent/hf/modeling_latent.py);
`megatron` is `megatron_latent.inference.generate` (what `python -m megatron_latent.generate`
runs; prefill "jacobi"); `authors` is their LLaMA file (modeling_llama.py of LUMIA-Group/PonderLM-2,
the file their N=1 runs use) in a worker under `--reference-python` (their code needs transformers
4.46.x), decoding through their own KV-cached path with the same weights as ours. The greedy tokens
of the three latent paths are compared (they must agree). Models run interleaved, round after
round (the authors' worker after ours), and medians are reported, so a busy machine slows all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODELS = ("latent", "twin", "vanilla-2x")


# --------------------------------------------------------------------------------- models
def configs(args):
    from megatron_latent.config import get_preset

    over = {k: v for k, v in dict(num_layers=args.num_layers, hidden_size=args.hidden_size,
                                  num_attention_heads=args.num_attention_heads,
                                  ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size).items()
            if v is not None}
    longest = max(args.prefill_lengths + [args.prompt + args.decode])
    base = get_preset(args.model_preset, seq_length=longest + 1, num_query_groups=None, **over)
    return {"latent": base.replace(num_latent_thoughts=1, scale_embeddings=True),
            "twin": base, "vanilla-2x": base.replace(num_layers=2 * base.num_layers)}


def build(cfg):
    """(megatron LatentGPTModel, our HF model) with the same weights (the megatron model's paper
    init, mapped as the export maps it)."""
    import torch
    import transformers

    from megatron_latent.hf import modeling_latent as ml
    from megatron_latent.hf.export import _LATENT_CLASSES, _LATENT_CONFIGS, hf_config_dict, is_latent
    from megatron_latent.hf.mapping import megatron_to_hf
    from megatron_latent.models.gpt import build_gpt_model
    from megatron_latent.models.latent import LatentGPTModel

    torch.manual_seed(0)
    meg = build_gpt_model(cfg, model_cls=LatentGPTModel, latent=cfg.latent, use_te=False).eval()
    full = {k: v.detach() for k, v in meg.state_dict().items() if not k.endswith("_extra_state")}
    state, _ = megatron_to_hf(full, cfg)
    d = hf_config_dict(cfg)
    if is_latent(cfg):
        hf = getattr(ml, _LATENT_CLASSES[cfg.arch])(getattr(ml, _LATENT_CONFIGS[cfg.arch]).from_dict(d))
    else:
        hf = getattr(transformers, d["architectures"][0])(transformers.CONFIG_MAPPING[d["model_type"]].from_dict(d))
    hf.load_state_dict(state, strict=False)
    return meg, hf.eval(), state, d


# ---------------------------------------------------------------------------------- FLOPs
def flops(cfg, args):
    """FLOPs of each measurement (models/flops.py): a decode step per sample (mean over the decoded
    positions), a prefill (the evaluation forward's passes, the output layer for the last position
    only) and a scored request (every position's logits)."""
    from megatron_latent.models.flops import model_decode_flops, model_step_flops

    j = cfg.latent.jacobi_iters_eval
    out = 2 * cfg.hidden_size * cfg.padded_vocab_size
    decode = statistics.mean(model_decode_flops(cfg, p) for p in range(args.prompt, args.prompt + args.decode))
    prefill = {p: model_step_flops(cfg, p, j, training=False) - (p - 1) * out for p in args.prefill_lengths}
    exact = {p: sum(model_decode_flops(cfg, q) for q in range(p)) - (p - 1) * out for p in args.prefill_lengths}
    return {"decode_per_token": decode, "prefill": prefill, "prefill-exact": exact,
            "score_request": model_step_flops(cfg, args.prompt + 4, j, training=False)}


def decode_bytes(cfg, batch, args):
    """Weights and KV cache a decode step of `batch` samples reads (models/flops.py), mean over the
    decoded positions: where a step is bound by memory, its time follows this rather than FLOPs."""
    from megatron_latent.models.flops import model_decode_bytes

    return statistics.mean(model_decode_bytes(cfg, p, batch) for p in range(args.prompt, args.prompt + args.decode))


# ------------------------------------------------------------------------------- timings
def _ids(b, length, vocab, seed=0):
    import torch

    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


def hf_decode(model, ids, steps):
    """Per-step seconds of greedy cached decoding after a prefill of `ids`, and the tokens."""
    import torch

    with torch.no_grad():
        mask = torch.ones_like(ids)
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache, tokens, times = out.past_key_values, [nxt], []
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            t = time.perf_counter()
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
    return times, torch.cat(tokens, 1).tolist()


def hf_prefill(model, ids, mode=None):
    import torch

    kw = {"latent_prefill": mode} if mode else {}
    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1, **kw)
        return time.perf_counter() - t


def meg_decode(model, ids, steps):
    """generate()'s loop (megatron_latent/inference/generate.py) with each token step timed."""
    import torch

    from megatron_latent.inference import LatentKVDecoder, PrefillParams

    b, p = ids.shape
    pos = torch.arange(p).expand(b, p)
    valid = torch.ones(b, 1, dtype=torch.bool)
    with torch.no_grad():
        decoder = LatentKVDecoder(model, b, p + steps)
        hidden, _ = decoder.prefill(ids, pos, valid.expand(b, p), PrefillParams("jacobi"))
        last, tokens, times = ids[:, -1:], [], []
        for k in range(steps):
            if k:
                t = time.perf_counter()
                hidden = decoder.step(last, pos[:, -1:] + k, valid)
            logits = model.output(hidden[-1:], last, pos[:, -1:] + k, runtime_gather_output=True)
            last = logits[:, -1].argmax(-1)[:, None]
            if k:
                times.append(time.perf_counter() - t)
            tokens.append(last)
    return times, torch.cat(tokens, 1).tolist()


def meg_prefill(model, ids, mode="jacobi"):
    from megatron_latent.inference import PrefillParams, generate

    t = time.perf_counter()
    generate(model, ids, 1, prefill=PrefillParams(mode))
    return time.perf_counter() - t


def scorer(model, vocab, args):
    """(lm-eval's HFLM over `model` with a word-level tokenizer of its vocabulary, its requests)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w0", pad_token="w0")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.score_batch_size, device="cpu")
    ids = _ids(args.requests, args.prompt + 4, vocab, seed=5).tolist()
    reqs = [Instance("loglikelihood", {}, (" ".join(f"w{t}" for t in row[:-4]),
                                           " " + " ".join(f"w{t}" for t in row[-4:])), i)
            for i, row in enumerate(ids)]
    return lm, reqs


def score(lm_reqs):
    lm, reqs = lm_reqs
    t = time.perf_counter()
    lm.loglikelihood(reqs, disable_tqdm=True)
    return len(reqs) / (time.perf_counter() - t)


# ------------------------------------------------------------------------- the authors' side
def worker(spec_path: str) -> None:
    """Under the reference interpreter: their LlamaForCausalLM on our weights; prints one JSON line
    per measurement (decode per batch, prefill per length) and their greedy tokens."""
    import importlib.util

    import torch
    import transformers

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    conf = dict(spec["config"])
    for k in ("auto_map", "architectures", "model_type", "dtype"):
        conf.pop(k, None)
    conf.update(num_latent_thoughts=1, interpolation=False, scale_embeds=True, recurrent_model=True,
                num_jacobi_iterations=spec["jacobi"], random_jacobi_iterations=False, use_cache=True)
    config = transformers.LlamaConfig(**conf)
    module_spec = importlib.util.spec_from_file_location("authors_modeling_llama", spec["file"])
    mod = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(mod)
    model = mod.LlamaForCausalLM(config).float().eval()
    model.load_state_dict(torch.load(spec["weights"]), strict=False)

    def run(ids, steps):
        """Their generation: the prefill branch on an empty cache, then their decoding branch."""
        b, p = ids.shape
        times, tokens = [], []
        with torch.no_grad():
            t = time.perf_counter()
            out = model(input_ids=ids, past_key_values=transformers.DynamicCache(), use_cache=True)
            first = time.perf_counter() - t
            for k in range(steps):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
                if k == steps - 1:
                    break
                pos = torch.full((b, 1), p + k, dtype=torch.long)
                t = time.perf_counter()
                out = model(input_ids=nxt, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
                times.append(time.perf_counter() - t)
        return first, times, torch.cat(tokens, 1).tolist()

    vocab = spec["vocab"]
    for r in range(spec["rounds"]):
        for b in spec["batch_sizes"]:
            _, times, tokens = run(_ids(b, spec["prompt"], vocab, seed=1), spec["decode"])
            print(json.dumps({"kind": "decode", "batch": b, "round": r, "s": statistics.median(times),
                              "tokens": tokens[0]}), flush=True)
        for p in spec["prefill_lengths"]:
            first, _, _ = run(_ids(spec["prefill_batch"], p, vocab, seed=2), 1)
            print(json.dumps({"kind": "prefill", "length": p, "round": r, "s": first}), flush=True)


def authors(args, state, hf_dict, vocab, jacobi) -> list:
    import torch

    tmp = tempfile.mkdtemp(prefix="bench_inference_")
    torch.save(state, os.path.join(tmp, "weights.pt"))
    spec = dict(config=hf_dict, weights=os.path.join(tmp, "weights.pt"),
                file=os.path.abspath(args.authors_modeling_file), threads=torch.get_num_threads(), jacobi=jacobi,
                vocab=vocab, rounds=args.rounds,
                batch_sizes=args.batch_sizes, prompt=args.prompt, decode=args.decode,
                prefill_lengths=args.prefill_lengths, prefill_batch=args.prefill_batch_size)
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    run = subprocess.run([args.reference_python, os.path.abspath(__file__), "--worker", os.path.join(tmp, "spec.json")],
                         capture_output=True, text=True)
    if run.returncode:
        sys.stderr.write(run.stderr[-4000:])
        raise SystemExit(f"error: --reference-python {args.reference_python}: the authors' worker failed")
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


# ------------------------------------------------------------------------------------ main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-preset", default="llama-125m")
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--ffn-hidden-size", type=int, default=1376)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill-lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--exact-prefill-max", type=int, default=512,
                   help="time the exact rollout's prefill only up to this length ((N+1) x length sequential steps)")
    p.add_argument("--prefill-batch-size", type=int, default=1, help="samples per prefill measurement")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding; scored request length")
    p.add_argument("--decode", type=int, default=32, help="greedy tokens per decode measurement")
    p.add_argument("--requests", type=int, default=32, help="loglikelihood requests per scoring measurement")
    p.add_argument("--score-batch-size", type=int, default=8)
    p.add_argument("--paths", nargs="+", default=["hf", "megatron"], choices=["hf", "megatron"])
    p.add_argument("--authors-modeling-file", default=None, help="their modeling_llama.py")
    p.add_argument("--reference-python", default=None, help="a Python with torch and transformers 4.46.x")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.__dict__.update(model_preset="tiny-llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                             ffn_hidden_size=176, batch_sizes=[1, 2], prefill_lengths=[8, 16], prompt=8, decode=3,
                             requests=4, score_batch_size=2, rounds=1)
    if args.decode < 2:
        p.error("--decode must be at least 2 (the first token comes from the prefill)")
    if bool(args.authors_modeling_file) != bool(args.reference_python):
        p.error("--authors-modeling-file and --reference-python go together")
    if args.authors_modeling_file and not os.path.isfile(args.authors_modeling_file):
        p.error(f"--authors-modeling-file {args.authors_modeling_file}: no such file")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch

    from megatron_latent.parallel.initialize import initialize_single_process

    if args.threads:
        torch.set_num_threads(args.threads)
    initialize_single_process("bench_inference")
    cfgs = configs(args)
    built = {name: build(cfg) for name, cfg in cfgs.items()}
    vocab = cfgs["latent"].vocab_size
    times = {}  # (path, model, kind, size) -> [seconds or requests/s]
    tokens = {}

    def add(key, value):
        times.setdefault(key, []).append(value)

    scorers = {name: scorer(built[name][1], vocab, args) for name in MODELS} if "hf" in args.paths else {}
    for r in range(args.rounds):
        for name in MODELS:
            meg, hf = built[name][:2]
            for path in args.paths:
                model = hf if path == "hf" else meg
                for b in args.batch_sizes:
                    step_times, toks = (hf_decode if path == "hf" else meg_decode)(
                        model, _ids(b, args.prompt, vocab, seed=1), args.decode)
                    add((path, name, "decode", b), statistics.median(step_times))
                    tokens[(path, name, b)] = toks[0]
                for p in args.prefill_lengths:
                    prefill = hf_prefill if path == "hf" else meg_prefill
                    prompt = _ids(args.prefill_batch_size, p, vocab, seed=2)
                    add((path, name, "prefill", p), prefill(model, prompt))
                    if name == "latent" and p <= args.exact_prefill_max:
                        add((path, name, "prefill-exact", p), prefill(model, prompt, "exact"))
            if name in scorers:
                add(("hf", name, "score", args.requests), score(scorers[name]))
    if args.authors_modeling_file:
        _, _, state, hf_dict = built["latent"]
        for row in authors(args, state, hf_dict, vocab, cfgs["latent"].latent.jacobi_iters_eval):
            size = row["batch"] if row["kind"] == "decode" else row["length"]
            add(("authors", "latent", row["kind"], size), row["s"])
            if row["kind"] == "decode":
                tokens[("authors", "latent", size)] = row["tokens"]
    report(args, cfgs, times, tokens)
    return 0


def report(args, cfgs, times, tokens):
    fl = {name: flops(cfg, args) for name, cfg in cfgs.items()}
    rows = []
    print(f"preset {args.model_preset} ({cfgs['twin'].num_layers} layers, hidden {cfgs['twin'].hidden_size}), "
          f"prompt {args.prompt}, decode {args.decode}, prefill batch {args.prefill_batch_size}, {args.rounds} rounds, "
          "fp32 cpu")
    print(f"{'path':9s} {'model':11s} {'measure':13s} {'size':>5s} {'value':>10s} {'unit':8s} "
          f"{'GFLOP':>9s} {'x 2x-layers':>11s} {'FLOP x':>7s} {'bytes x':>7s}")
    for (path, name, kind, size), vals in sorted(times.items()):
        v = statistics.median(vals)
        pb = args.prefill_batch_size
        f = {"decode": fl[name]["decode_per_token"] * size, "prefill": fl[name]["prefill"].get(size, 0) * pb,
             "prefill-exact": fl[name]["prefill-exact"].get(size, 0) * pb, "score": fl[name]["score_request"]}[kind]
        f2 = {"decode": fl["vanilla-2x"]["decode_per_token"] * size,
              "prefill": fl["vanilla-2x"]["prefill"].get(size, 0) * pb,
              "score": fl["vanilla-2x"]["score_request"]}[kind.split("-")[0]]
        base = times.get(("hf" if path == "authors" else path, "vanilla-2x", kind.split("-")[0], size))
        ratio = None
        if base:
            b = statistics.median(base)
            ratio = b / v if kind == "score" else v / b  # time per unit against the 2x-layers model
        value, unit = (v * 1e3, "ms/token") if kind == "decode" else (v, "req/s") if kind == "score" else (v, "s")
        by = None
        if kind == "decode":  # bytes read per step against the 2x-layers model's
            by = decode_bytes(cfgs[name], size, args) / decode_bytes(cfgs["vanilla-2x"], size, args)
        rows.append(dict(path=path, model=name, measure=kind, size=size, value=value, unit=unit, flops=f,
                         time_ratio_vs_2x=ratio, flop_ratio_vs_2x=f / f2, bytes_ratio_vs_2x=by))
        print(f"{path:9s} {name:11s} {kind:13s} {size:5d} {value:10.3f} {unit:8s} {f / 1e9:9.3f} "
              f"{'' if ratio is None else f'{ratio:11.2f}':>11s} {f / f2:7.2f} "
              f"{'' if by is None else f'{by:7.2f}':>7s}")
    latent = {k: v for k, v in tokens.items() if k[1] == "latent"}
    by_batch = {}
    for (path, _, b), toks in latent.items():
        by_batch.setdefault(b, {})[path] = toks
    agree = all(len({json.dumps(t) for t in paths.values()}) == 1 for paths in by_batch.values())
    print(f"greedy tokens of the latent paths ({', '.join(sorted({k[0] for k in latent}))}) agree: {agree}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows,
                       "tokens_agree": agree}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
