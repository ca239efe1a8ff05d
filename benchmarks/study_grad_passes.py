"""The study of cheaper latent training (--jacobi-grad-passes K), reproducible by one command:

    python benchmarks/study_grad_passes.py --work /tmp/study_grad_passes [--steps 600 --seeds 1 2]

1. data: the sample corpus split by document (every 50th document held out for validation, every
   5th of the rest for training: more than the runs read), a byte-level BPE of 512 tokens trained
   on the training split (a small output layer keeps the latent passes, not the logits, the bulk
   of each step, as in real models, and a few hundred steps learn more than unigram statistics),
   both splits tokenized with tools/preprocess_data.py; tokens per UTF-8 byte of the validation
   split.
2. training, one run after another (GPT-NeoX family, 2 layers x 64, seq 64, N=1, the family's
   J range 2-4): full backprop; K = 1 and 2 at equal tokens (same steps) and at equal training
   FLOPs (more steps, from models/flops.model_step_flops averaged over the J range); a vanilla
   N=0 run at equal tokens for scale. Every run writes its checkpoint and metrics.jsonl.
3. evaluation (benchmarks/eval_jacobi.py; bits per byte from the loss): each checkpoint's loss on
   the whole validation split at the driver's evaluation J (3), the table's headline; and on 64
   windows of it at evaluation J = 0..6 and with the exact sequential rollout, which is slow.

Sized for a shared 2-core CPU (about 28 minutes for both seeds there, one thread per run; 5 of them
the whole-split evaluations); on a free machine raise --steps.

Finished runs and evaluations are kept under --work and not redone; the tables are printed at the
end (markdown) and written to <work>/results.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
MODEL = dict(preset="tiny-pythia", layers=2, hidden=64, heads=4, ffn=256, seq=64, n=1)
EVAL_J = list(range(7))
HEADLINE_J = 3  # the driver's default --jacobi-iters-eval


def prepare_data(work: str, corpus: str, vocab: int) -> dict:
    """Split, train the BPE, tokenize; {"train", "valid", "tokenizer", "tokens_per_byte", ...}."""
    out = os.path.join(work, "data")
    info_path = os.path.join(out, "data.json")
    if os.path.exists(info_path):
        return json.load(open(info_path))
    import zstandard
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_latent.data.indexed import summarize

    os.makedirs(out, exist_ok=True)
    splits = {"train": [], "valid": []}
    with open(corpus, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for i, line in enumerate(reader):
            if i % 50 == 0 or i % 5 == 1:
                splits["valid" if i % 50 == 0 else "train"].append(json.loads(line)["text"])
    for name, texts in splits.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(splits["train"], trainer=trainer)
    tokenizer = os.path.join(out, "tokenizer.json")
    tok.save(tokenizer)

    info = {"tokenizer": tokenizer}
    for name, texts in splits.items():
        prefix = os.path.join(out, name)
        _run([PY, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", prefix + ".jsonl",
              "--json-keys", "text", "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
              "--tokenizer-model", tokenizer, "--append-eod", "--workers", "2", "--no-progress"],
             os.path.join(out, f"preprocess_{name}.log"))
        s = summarize(prefix + "_text_document")
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        info[name] = {"prefix": s.prefix, "documents": s.documents, "tokens": s.tokens, "bytes": text_bytes}
    # Tokens (the EOD of each document included) per byte of text: the EOD predictions' loss is
    # charged to the text's bytes, so bits per byte counts every predicted token.
    info["tokens_per_byte"] = info["valid"]["tokens"] / info["valid"]["bytes"]
    json.dump(info, open(info_path, "w"), indent=1)
    return info


def step_flops(n: int, k, vocab: int) -> float:
    """Training FLOPs of one sequence, averaged over the family's J range (drawn uniformly)."""
    from megatron_latent.config import get_preset
    from megatron_latent.models.flops import model_step_flops

    cfg = get_preset(MODEL["preset"]).replace(
        num_layers=MODEL["layers"], hidden_size=MODEL["hidden"], num_attention_heads=MODEL["heads"],
        ffn_hidden_size=MODEL["ffn"], vocab_size=vocab, num_latent_thoughts=n, grad_passes=k)
    js = range(cfg.latent.jacobi_iters[0], cfg.latent.jacobi_iters[1] + 1) if n else [0]
    counts = [model_step_flops(cfg, MODEL["seq"], j) for j in js]
    return sum(counts) / len(counts)


def plan_runs(steps: int, seeds, vocab: int, batch: int) -> list:
    full = step_flops(MODEL["n"], None, vocab)
    runs = []
    for seed in seeds:
        runs.append(dict(name=f"full-s{seed}", n=MODEL["n"], k=None, steps=steps, seed=seed, budget="-"))
        for k in (1, 2):
            runs.append(dict(name=f"k{k}-tokens-s{seed}", n=MODEL["n"], k=k, steps=steps, seed=seed,
                             budget="tokens"))
            equal = round(steps * full / step_flops(MODEL["n"], k, vocab))
            runs.append(dict(name=f"k{k}-flops-s{seed}", n=MODEL["n"], k=k, steps=equal, seed=seed, budget="FLOPs"))
        runs.append(dict(name=f"vanilla-s{seed}", n=0, k=None, steps=steps, seed=seed, budget="tokens"))
    for r in runs:
        r["flops"] = r["steps"] * batch * step_flops(r["n"], r["k"], vocab)
        r["tokens"] = r["steps"] * batch * MODEL["seq"]
    return runs


def train(work: str, run: dict, data: dict, batch: int, lr: float) -> float:
    """Train one run (skipped when done before); its median ms per step (the driver's log)."""
    d = os.path.join(work, "runs", run["name"])
    done = os.path.join(d, "done.json")
    if os.path.exists(done):
        return json.load(open(done))["ms_per_step"]
    cmd = [PY, "-m", "megatron_latent.pretrain", "--model-preset", MODEL["preset"],
           "--num-layers", str(MODEL["layers"]), "--hidden-size", str(MODEL["hidden"]),
           "--num-attention-heads", str(MODEL["heads"]), "--ffn-hidden-size", str(MODEL["ffn"]),
           "--max-position-embeddings", str(MODEL["seq"]), "--seq-length", str(MODEL["seq"]),
           "--num-latent-thoughts", str(run["n"]),
           "--train-data-path", data["train"]["prefix"], "--valid-data-path", data["valid"]["prefix"],
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["tokenizer"],
           "--data-cache-path", os.path.join(work, "cache"), "--num-workers", "0",
           "--micro-batch-size", str(batch), "--global-batch-size", str(batch),
           "--train-iters", str(run["steps"]), "--lr", str(lr), "--min-lr", str(lr / 10),
           "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05", "--weight-decay", "0.1",
           "--clip-grad", "1.0", "--seed", str(run["seed"]), "--eval-interval", str(run["steps"]),
           "--eval-iters", "4", "--log-interval", "20", "--tensorboard-dir", d, "--save", d,
           "--save-interval", str(run["steps"])]
    if run["k"] is not None:
        cmd += ["--jacobi-grad-passes", str(run["k"])]
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "metrics.jsonl")):
        os.remove(os.path.join(d, "metrics.jsonl"))  # a run cut short starts over
    print(f"[{time.strftime('%H:%M:%S')}] train {run['name']}: {run['steps']} steps", flush=True)
    t0 = time.time()
    _run(cmd, os.path.join(d, "train.log"))
    readings = [float(m) for m in re.findall(r"\| ([0-9.]+) ms/step", open(os.path.join(d, "train.log")).read())]
    ms = sorted(readings)[len(readings) // 2] if readings else float("nan")
    json.dump({"wall_s": time.time() - t0, "ms_per_step": ms}, open(done, "w"))
    return ms


def evaluate(work: str, run: dict, data: dict, windows: int, js, rollout: bool, name: str) -> dict:
    """Loss of the run's checkpoint on `windows` validation windows at each J of `js` (N=0: J=0),
    with the exact rollout when `rollout`; cached in <run>/<name>."""
    d = os.path.join(work, "runs", run["name"])
    out = os.path.join(d, name)
    if not os.path.exists(out):
        cmd = [PY, os.path.join(ROOT, "benchmarks", "eval_jacobi.py"), "--load", d,
               "--data-path", data["valid"]["prefix"],
               "--num-windows", str(windows), "--jacobi", *map(str, js if run["n"] else [0]),
               "--tokens-per-byte", str(data["tokens_per_byte"]), "--json", out]
        if not (rollout and run["n"]):
            cmd.append("--no-rollout")
        _run(cmd, os.path.join(d, name.replace(".json", ".log")))
    return json.load(open(out))


def _run(cmd, log):
    with open(log, "w") as f:
        # One thread: on a small, busy CPU a second thread mostly waits for a core.
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"error: exit {r.returncode} of {' '.join(cmd)}; see {log}")


def tables(runs, split, sweep, step_ms, data) -> str:
    v = data["valid"]
    first = runs[0]["name"]
    lines = [f"validation: {v['documents']} documents, {v['tokens']:,} tokens, {v['bytes']:,} bytes "
             f"({data['tokens_per_byte']:.4f} tokens/byte); losses on {split[first]['tokens']:,} tokens "
             f"(every window of the split), at evaluation J={HEADLINE_J}", "",
             "| run | N | K | budget | steps | tokens | train TFLOP | ms/step | valid loss | bits/byte |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        e = split[r["name"]]
        key = str(HEADLINE_J) if r["n"] else "0"
        lines.append(f"| {r['name']} | {r['n']} | {r['k'] or 'all'} | {r['budget']} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['flops'] / 1e12:.2f} | {step_ms[r['name']]:.0f} | "
                     f"{e['loss'][key]:.4f} | {e['bpb'][key]:.4f} |")
    lines += ["", f"validation loss against the evaluation J (N=1 runs; {sweep[first]['tokens']:,} tokens):", "",
              "| run | " + " | ".join(f"J={j}" for j in EVAL_J) + " | exact |",
              "|---|" + "---|" * (len(EVAL_J) + 1)]
    for r in runs:
        if r["n"]:
            e = sweep[r["name"]]["loss"]
            cells = [f"{e[str(j)]:.4f}" for j in EVAL_J] + [f"{e['exact']:.4f}"]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/study_grad_passes")
    p.add_argument("--corpus", default=os.path.join(ROOT, "..", "shared", "data", "sample-corpus.jsonl.zst"))
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=600, help="steps of the full-backprop run")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=64, help="windows of the J sweep and exact rollout")
    p.add_argument("--only", nargs="+", help="run only these runs (names as in the table)")
    args = p.parse_args()

    t0 = time.time()
    data = prepare_data(args.work, args.corpus, args.vocab)
    print(f"[{time.strftime('%H:%M:%S')}] data ready ({time.time() - t0:.0f} s): {json.dumps(data)}", flush=True)
    runs = plan_runs(args.steps, args.seeds, args.vocab, args.batch)
    if args.only:
        runs = [r for r in runs if r["name"] in args.only]
    whole = data["valid"]["tokens"] // (MODEL["seq"] + 1)  # every window of the split
    step_ms, split, sweep = {}, {}, {}
    for r in runs:
        step_ms[r["name"]] = train(args.work, r, data, args.batch, args.lr)
        split[r["name"]] = evaluate(args.work, r, data, whole, [HEADLINE_J], False, "eval_split.json")
        sweep[r["name"]] = evaluate(args.work, r, data, args.eval_windows, EVAL_J, True, "eval.json")
    text = tables(runs, split, sweep, step_ms, data)
    open(os.path.join(args.work, "results.md"), "w").write(text + "\n")
    print(text)
    print(f"total wall time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
