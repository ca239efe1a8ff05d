"""A scaling study of latent thoughts: plan, run and analyse a grid of sizes x methods x seeds.

    python tools/scaling_study.py --tiny --corpus corpus.jsonl --work /tmp/scaling-tiny   # minutes, 2 cores
    python tools/scaling_study.py --ladder cpu --corpus ../shared/data/sample-corpus.jsonl.zst --work W
    python tools/scaling_study.py --ladder paper-llama --data-path D_text_document --tokenizer-model T \
        --seq-length 2048 --global-batch-size 256 --micro-batch-size 8 --pretrain-args=--bf16 \
        --tflops 3200 --dry-run --gpus-per-run 8 --slurm study.sbatch

The grid (megatron_latent/analysis/scaling_grid.py): a ladder of sizes (depth and width grown
together), methods vanilla, latent N=1 (`--jacobi-grad-passes 2` by default), vanilla with 2x layers and one
extra loop (the two equal-inference-FLOP baselines), optionally latent N=2; equal tokens per
non-embedding parameter (`--tokens-per-param`, the size's vanilla count for every method of the
size) and optionally equal training FLOPs (`--budget tokens flops`); every method with the same
init formula, weight decay, schedule and (at equal tokens) data order. The plan and its cost are
printed first, in FLOPs and in hours at --tflops, or at the rate the finished runs reached.
--dry-run prints the commands instead (torchrun lines) and --slurm writes an array script.

Runs go through `python -m megatron_latent.pretrain`, one directory each under <work>/runs (its
checkpoint, resumed when cut, and metrics.jsonl); finished runs are skipped. Then
<work>/results.md gets the table (tools/compare_runs.py's), the fits and the effective multipliers
against vanilla with bootstrap intervals over seeds (megatron_latent/analysis/scaling.py), and
<work>/scaling.png loss against parameters, training FLOPs and inference FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import megatron_latent
from megatron_latent.analysis import scaling_grid as grid

# Where `megatron_latent` imports from: the runs' PYTHONPATH and working directory, so that they train
# with this code (a checkout, or an installed copy).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(megatron_latent.__file__)))

ASSUMED_TFLOPS = 0.04  # what examples/reproduce_small.sh --tiny runs reached on 2 quiet CPU cores
TINY = dict(tokens_per_param=5.0, seq_length=64, global_batch_size=16, micro_batch_size=16, eval_iters=4,
            saves_per_run=1)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/scaling-study", help="runs, data and results go here")
    p.add_argument("--tiny", action="store_true",
                   help="the quick mode: ladder 'tiny', 5 tokens per parameter, 64-token sequences, 2 jobs")
    p.add_argument("--ladder", choices=sorted(grid.LADDERS), default=None, help="the sizes (default: cpu)")
    p.add_argument("--sizes", nargs="+", default=None, help="only these sizes of the ladder")
    p.add_argument("--methods", nargs="+", default=list(grid.DEFAULT_METHODS), help=f"of {', '.join(grid.METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens-per-param", type=float, default=None, help="tokens per non-embedding parameter (20)")
    p.add_argument("--budget", nargs="+", choices=["tokens", "flops"], default=["tokens"])
    p.add_argument("--seq-length", type=int, default=None, help="(128; --tiny 64)")
    p.add_argument("--global-batch-size", type=int, default=None, help="sequences per step (16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="(16)")
    p.add_argument("--eval-iters", type=int, default=None, help="validation batches of the final evaluation (32)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--jacobi-grad-passes", type=int, default=2,
                   help="passes backpropagated in latent runs (2; 0: every pass, the paper's full backprop)")
    p.add_argument("--pretrain-args", default="",
                   help="more pretrain flags for every run, as one string: --pretrain-args='--bf16 --num-workers 2'")
    g = p.add_argument_group("data (an indexed dataset, or a corpus to train a BPE on and tokenize)")
    g.add_argument("--data-path", default=None, help="indexed dataset prefix (tools/preprocess_data.py)")
    g.add_argument("--tokenizer-model", default=None, help="its tokenizer.json (HuggingFaceTokenizer)")
    g.add_argument("--split", default="95,5,0", help="train/valid/test split of --data-path")
    g.add_argument("--corpus", nargs="+", default=None, help="JSONL corpus: <work>/data gets a BPE and the dataset")
    g.add_argument("--vocab-size", type=int, default=512, help="the BPE's vocabulary (also the plan's without one)")
    g = p.add_argument_group("cost, launch and analysis")
    g.add_argument("--tflops", type=float, default=None,
                   help="TFLOP/s of one run (all its GPUs) for the plan's hours (default: measured on the finished "
                        f"runs, else {ASSUMED_TFLOPS} / --jobs, assumed for 2 CPU cores)")
    g.add_argument("--overhead-s", type=float, default=20.0, help="seconds per run beyond its FLOPs (start-up, saves)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    g.add_argument("--gpus-per-run", type=int, default=1, help="torchrun --nproc_per_node of --dry-run's lines")
    g.add_argument("--slurm", default=None, help="write a Slurm array script of the runs to this file")
    g.add_argument("--jobs", type=int, default=None, help="runs at once on this machine (1; --tiny 2)")
    g.add_argument("--analyze-only", action="store_true", help="run nothing; analyse the finished runs")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals")
    args = p.parse_args(argv)
    if args.corpus and args.data_path:
        p.error("--corpus and --data-path: give one")
    if args.data_path and not args.tokenizer_model:
        p.error("--data-path needs --tokenizer-model")
    if not (args.corpus or args.data_path):
        p.error("no data: give --corpus FILE or --data-path PREFIX --tokenizer-model FILE")
    # Absolute paths: a run's flags are recorded and must not depend on the directory it was started from.
    args.work = os.path.abspath(args.work)
    for name in ("data_path", "tokenizer_model"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    args.corpus = [os.path.abspath(c) for c in args.corpus] if args.corpus else None
    for path in args.corpus or []:
        if not os.path.exists(path) and not args.dry_run:
            p.error(f"--corpus: no such file or directory {path}")
    return p, args


def settings(p, args) -> grid.Settings:
    tiny = TINY if args.tiny else {}
    ladder = grid.LADDERS[args.ladder or ("tiny" if args.tiny else "cpu")]
    if args.sizes:
        unknown = [s for s in args.sizes if s not in {z.name for z in ladder}]
        if unknown:
            p.error(f"--sizes: {', '.join(unknown)} not in the ladder ({', '.join(z.name for z in ladder)})")
        ladder = [z for z in ladder if z.name in args.sizes]
    tokenizer = _tokenizer(args)
    vocab = args.vocab_size
    if os.path.exists(tokenizer):
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(tokenizer).get_vocab_size()

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else tiny.get(name, default)

    return grid.Settings(
        ladder=ladder, methods=args.methods, seeds=args.seeds, tokens_per_param=pick("tokens_per_param", 20.0),
        budgets=args.budget, vocab_size=vocab, seq_length=pick("seq_length", 128),
        global_batch_size=pick("global_batch_size", 16), micro_batch_size=pick("micro_batch_size", 16),
        eval_iters=pick("eval_iters", 32), weight_decay=args.weight_decay, saves_per_run=tiny.get("saves_per_run", 4),
        grad_passes=args.jacobi_grad_passes or None,
        extra_flags=shlex.split(args.pretrain_args))


def _tokenizer(args) -> str:
    return args.tokenizer_model or os.path.join(args.work, "data", "tokenizer.json")


def data_flags(args):
    prefix = args.data_path or os.path.join(args.work, "data", "corpus_text_document")
    return ["--data-path", prefix, "--split", args.split, "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", _tokenizer(args), "--data-cache-path", os.path.join(args.work, "cache")]


def prepare_data(args) -> None:
    """A byte-level BPE trained on --corpus and the corpus tokenized with it (kept when done)."""
    from megatron_latent.data.pycorpus import train_bpe_tokenizer

    out = os.path.join(args.work, "data")
    tok, prefix = os.path.join(out, "tokenizer.json"), os.path.join(out, "corpus")
    if not os.path.exists(tok):
        print(f"training a {args.vocab_size}-token BPE on {' '.join(args.corpus)}", flush=True)
        try:
            train_bpe_tokenizer(args.corpus, tok, args.vocab_size)
        except (OSError, ValueError) as e:
            sys.exit(f"error: --corpus: {e}")
    if not os.path.exists(prefix + "_text_document.idx"):
        cmd = [sys.executable, "-m", "megatron_latent.tools.preprocess_data", "--input", *args.corpus,
               "--json-keys", "text", "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
               "--tokenizer-model", tok, "--append-eod", "--workers", "2", "--no-progress"]
        if subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}).returncode:
            sys.exit("error: --corpus: tools/preprocess_data.py failed (the preprocessing message is above)")


def run_dir(args, r) -> str:
    return os.path.join(args.work, "runs", r.name)


def finished(d: str, steps: int) -> bool:
    try:
        done = open(os.path.join(d, "latest_checkpointed_iteration.txt")).read().strip() == str(steps)
        return done and '"valid/loss"' in open(os.path.join(d, "metrics.jsonl")).read()
    except OSError:
        return False


def summaries(args, runs):
    """compare.RunSummary of every finished run, by run name."""
    from megatron_latent.analysis.compare import summarize_run

    return {r.name: summarize_run(run_dir(args, r), f"{r.size.name} {r.label}")
            for r in runs if finished(run_dir(args, r), r.steps)}


def train(args, runs, threads: int) -> None:
    """Every unfinished run, `args.jobs` at a time; the first failure stops new starts."""
    failed, lock = [], threading.Lock()

    def one(r):
        if failed:
            return
        d = run_dir(args, r)
        os.makedirs(d, exist_ok=True)
        cmd = grid.command(r, d, data_flags(args), [sys.executable, "-m", "megatron_latent.pretrain"])
        print(f"start {r.name}: {r.steps} steps", flush=True)
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(threads),
               "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning"}
        with open(d + ".log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
        with lock:
            if rc or not finished(d, r.steps):
                failed.append(f"{r.name} (exit {rc}; see {d}.log)")
            else:
                print(f"done {r.name}", flush=True)

    todo = [r for r in runs if not finished(run_dir(args, r), r.steps)]
    for r in runs:
        if r not in todo:
            print(f"finished already: {r.name}")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    if failed:
        sys.exit("error: runs failed: " + "; ".join(failed))


def check_run_flags(args, runs) -> None:
    """A run directory belongs to the flags it was started with: a changed plan must not resume it."""
    for r in runs:
        d = run_dir(args, r)
        record = os.path.join(d, "run.json")
        flags = r.flags + data_flags(args)
        started = os.path.isdir(d) and set(os.listdir(d)) - {"run.json"}  # a plan that never ran may change
        if os.path.exists(record) and started:
            if json.load(open(record))["flags"] != flags:
                sys.exit(f"error: {d} was started with other flags ({record}); use another --work or remove it")
        else:
            os.makedirs(d, exist_ok=True)
            json.dump({"flags": flags}, open(record, "w"), indent=1)


def report(args, runs, done) -> str:
    from megatron_latent.analysis.compare import format_table
    from megatron_latent.analysis.scaling import Point, analyze, format_fits, format_multipliers, plot_scaling

    by_name = {r.name: r for r in runs}
    points = [Point(by_name[n].label, by_name[n].size.name, s.seed, s.cfg.num_parameters(include_embeddings=False),
                    s.train_flops, s.inference_flops_per_token, s.valid_loss) for n, s in done.items()]
    sizes_of = {}
    for pt in points:
        sizes_of.setdefault(pt.method, set()).add(pt.size)
    dropped = sorted(m for m, s in sizes_of.items() if len(s) < 2)
    points = [pt for pt in points if pt.method not in dropped]
    parts = [f"{len(done)} of {len(runs)} runs finished.", "", format_table(list(done.values()))]
    if dropped:
        parts += ["", f"Not fitted (fewer than 2 sizes finished): {', '.join(dropped)}."]
    if any(pt.method == "vanilla" for pt in points):
        res = analyze(points, bootstrap=args.bootstrap)
        png = os.path.join(args.work, "scaling.png")
        plot_scaling(res, points, png)
        parts += ["", "Fits of validation loss against each cost, x0 the points' geometric mean:", "",
                  format_fits(res), "", format_multipliers(res), "", f"Plot: {png}"]
    return "\n".join(parts)


def main(argv=None) -> int:
    p, args = parse_args(argv)
    args.jobs = args.jobs or (2 if args.tiny else 1)
    try:
        runs = grid.plan(settings(p, args))
    except ValueError as e:
        p.error(str(e))
    try:
        done = {} if args.dry_run else summaries(args, runs)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    rate, source = args.tflops, "given"
    walls = [s.wall_time_s for s in done.values()]
    if rate is None and done and None not in walls:
        rate, source = sum(s.train_flops for s in done.values()) / sum(walls) / 1e12, f"measured on {len(done)} runs"
    if rate is None:
        # The machine's rate, shared by the runs at once.
        rate, source = ASSUMED_TFLOPS / args.jobs, f"assumed: {ASSUMED_TFLOPS} for 2 CPU cores / {args.jobs}"
    print(grid.format_plan(runs, rate, source, args.overhead_s, args.jobs, args.gpus_per_run), flush=True)
    if args.dry_run or args.slurm:
        launcher = ["torchrun", "--standalone", "--nproc_per_node", str(args.gpus_per_run), "-m",
                    "megatron_latent.pretrain"]
        cmds = [grid.command(r, run_dir(args, r), data_flags(args), launcher) for r in runs]
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in cmds))
        if args.slurm:
            flags = [c[len(launcher):] for c in cmds]
            with open(args.slurm, "w") as f:
                f.write(grid.slurm_array(runs, flags, args.gpus_per_run, ROOT))
            print(f"wrote {args.slurm} (sbatch it; each task resumes its run when requeued)")
        if args.dry_run:
            return 0
    if not args.analyze_only:
        if args.corpus:
            prepare_data(args)
        elif not os.path.exists(args.data_path + ".idx"):
            p.error(f"--data-path: no {args.data_path}.idx (an indexed dataset prefix)")
        elif not os.path.isfile(args.tokenizer_model):
            p.error(f"--tokenizer-model: no such file {args.tokenizer_model}")
        check_run_flags(args, runs)
        train(args, runs, max(1, len(os.sched_getaffinity(0)) // args.jobs))  # the cores this process may use
    try:
        done = summaries(args, runs)
        text = report(args, runs, done)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    with open(os.path.join(args.work, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {os.path.join(args.work, 'results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
