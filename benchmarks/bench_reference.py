"""Training step time of this project beside the authors' HF implementation, on the same machine.

Both sides train the same GPT-NeoX shape in fp32 (parallel residual, rotary over 1/4 of the head,
no dropout, untied output layer, byte vocabulary), one process each, the same thread count: a
vanilla model (N=0) and a latent one (N=1, J fixed), one step = forward + backward + optimizer
step on one micro-batch of random tokens. Ours goes through the training path of the CLI
(megatron DDP, megatron's Adam, `engine.latent_train_step`); theirs is their
`GPTNeoXForCausalLM` (config keys num_latent_thoughts, scale_embeds, num_jacobi_iterations,
random_jacobi_iterations=false, interpolation=false) with torch's AdamW and the gradient clipping
their training has (HF Trainer's max_grad_norm 1.0, which their DeepSpeed config's
`gradient_clipping: auto` takes; ours clips at 1.0 too), in a worker process run by another
interpreter (their file needs transformers 4.46.x). The four step kinds run interleaved,
round after round, the side that goes first alternating, so that a busy shared machine slows all
of them alike; medians are reported.

Their modeling file is not part of this repository; get it with

    git clone https://github.com/LUMIA-Group/PonderLM-2
    # file: PonderLM-2/src/llamafactory/model/modeling/modeling_gpt_neox.py

and a Python with torch and transformers 4.46.x (e.g. `python -m venv hf446 && hf446/bin/pip install
torch "transformers==4.46.3"`). Then

    python benchmarks/bench_reference.py --authors-modeling-file PATH/modeling_gpt_neox.py \\
        --reference-python hf446/bin/python [--rounds 10 --threads 2]

`--reference-python` with no authors' file (or `--ours-only`) times only this project.

On a GPU, `--device cuda --bf16` compares the way both train there: ours megatron's bf16 path
(bf16 weights, fp32 main weights and gradient reduction in the optimizer), theirs bf16 weights
with fp32 master weights, clipping and AdamW on the masters, as their DeepSpeed ZeRO-0 bf16 config
does (sdpa attention on both sides: their scripts ask for flash-attn 2, which is not installed
here). Steps end with a device synchronisation. examples/gpu_smoke.sh runs it at the Pythia-410M
shape when AUTHORS_MODELING_FILE and REFERENCE_PYTHON are set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


# ------------------------------------------------------------------------- the authors' side
def worker(args) -> None:
    """Runs under the reference interpreter: builds their two models, then times one step per
    request line ("vanilla" / "latent") and answers with its seconds."""
    import importlib.util

    import torch
    from transformers import GPTNeoXConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    path = os.path.join(tmp, "authors_modeling_gpt_neox.py")
    shutil.copy(args.authors_modeling_file, path)
    spec = importlib.util.spec_from_file_location("authors_modeling_gpt_neox", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    dev, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32

    def model(n):
        cfg = GPTNeoXConfig(
            vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_attention_heads, intermediate_size=4 * args.hidden_size,
            max_position_embeddings=args.seq_length, rotary_pct=0.25, use_parallel_residual=True,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, use_cache=False,
            num_latent_thoughts=n, scale_embeds=bool(n), num_jacobi_iterations=args.jacobi,
            random_jacobi_iterations=False, interpolation=False, recurrent_model=True,
        )
        m = mod.GPTNeoXForCausalLM(cfg).to(dev, dtype).train()
        params = list(m.parameters())
        # bf16: fp32 master weights that the optimizer steps, copied back to the bf16 weights.
        masters = [p.detach().float().requires_grad_() for p in params] if args.bf16 else params
        return m, params, masters, torch.optim.AdamW(masters, lr=1e-4), cfg._attn_implementation

    def step(m, params, masters, opt):
        opt.zero_grad(set_to_none=True)
        m(input_ids=tokens, labels=tokens).loss.backward()
        if args.bf16:
            for p, w in zip(params, masters):
                w.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        if args.bf16:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)

    models = {"vanilla": model(0), "latent": model(1)}
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length), device=dev)
    print(f"ready attention={models['latent'][4]} torch={torch.__version__}", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        step(*models[line.strip()][:4])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(time.perf_counter() - t0, flush=True)


class Reference:
    def __init__(self, args):
        cmd = [args.reference_python, os.path.abspath(__file__), "--worker"] + [
            a for a in sys.argv[1:] if a != "--worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.banner = self.proc.stdout.readline().strip()
        if not self.banner.startswith("ready"):
            raise SystemExit(f"--reference-python {args.reference_python}: the authors' side did not start")

    def step(self, kind: str) -> float:
        try:
            self.proc.stdin.write(kind + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:  # it died; its traceback went to our stderr, above this message
            raise SystemExit(f"the authors' side stopped during a {kind} step (exit code {self.proc.wait()})")
        try:
            return float(line)
        except ValueError:
            self.proc.kill()
            raise SystemExit(f"the authors' side answered a {kind} step with {line.strip()!r}, not its seconds")

    def close(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


# ---------------------------------------------------------------------------------- our side
class Ours:
    def __init__(self, args):
        import torch
        from megatron.core.distributed import DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig

        from megatron_latent.config import ModelConfig
        from megatron_latent.models.transformer_config import to_transformer_config
        from megatron_latent.parallel.initialize import init_process_group, initialize_single_process
        from megatron_latent.parallel.pipeline import build_latent_pipeline
        from megatron_latent.training import engine

        torch.set_num_threads(args.threads)
        self.sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        if args.device == "cuda":  # a world of one on NCCL, before initialize_single_process's gloo default
            init_process_group(backend="nccl")
        initialize_single_process("bench_reference")
        self.args, self.engine = args, engine
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        base = ModelConfig(
            name="bench", arch="gpt-neox", num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
            vocab_size=args.vocab_size, seq_length=args.seq_length, rotary_percent=0.25,
        )
        self.models = {}
        for kind, n in (("vanilla", 0), ("latent", 1)):
            cfg = base.replace(num_latent_thoughts=n, scale_embeddings=bool(n))
            # As pretrain --bf16 builds it: bf16 weights, fp32 main weights and gradient reduction.
            config = to_transformer_config(cfg, 1, 1, None, params_dtype=dtype)
            chunks = engine.wrap_ddp(build_latent_pipeline(cfg, config),
                                     DistributedDataParallelConfig(grad_reduce_in_fp32=args.bf16))
            opt = engine.build_optimizer(chunks, OptimizerConfig(optimizer="adam", lr=1e-4, clip_grad=1.0,
                                                                 bf16=args.bf16, params_dtype=dtype))
            engine.configure_model_for_training(chunks, opt)
            self.models[kind] = (chunks, opt, args.jacobi if n else 0)
        self.base = base
        b, L = args.micro_batch_size, args.seq_length
        dev = torch.device(args.device)
        tokens = torch.randint(0, args.vocab_size, (b, L), device=dev)
        self.batch = {"tokens": tokens, "labels": tokens, "position_ids": torch.arange(L, device=dev).expand(b, L),
                      "loss_mask": torch.ones(b, L, device=dev)}

    def step(self, kind: str) -> float:
        chunks, opt, j = self.models[kind]
        a = self.args
        t0 = time.perf_counter()
        self.engine.latent_train_step(chunks, opt, iter([self.batch]), 1, a.seq_length, a.micro_batch_size, j)
        self.sync()
        return time.perf_counter() - t0

    def flop_ratio(self) -> float:
        from megatron_latent.models.flops import model_step_flops

        c, a = self.base, self.args

        def f(n, j):
            return model_step_flops(c.replace(num_latent_thoughts=n), a.seq_length, j)

        return f(1, a.jacobi) / f(0, 0)


# ------------------------------------------------------------------------------------ driver
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors-modeling-file", help="their modeling_gpt_neox.py (see above)")
    p.add_argument("--reference-python", default=sys.executable,
                   help="interpreter with torch and transformers 4.46.x for the authors' side")
    p.add_argument("--ours-only", action="store_true")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--jacobi", type=int, default=3, help="J of the latent model (N=1), fixed")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 weights, fp32 master weights (both sides)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # the reference interpreter has no megatron_latent
        return worker(args)
    from megatron_latent.analysis.stats import median_interval

    theirs = None
    if not args.ours_only:
        if not args.authors_modeling_file or not os.path.isfile(args.authors_modeling_file):
            raise SystemExit(f"--authors-modeling-file {args.authors_modeling_file!r}: not a file "
                             "(see the docstring: python benchmarks/bench_reference.py -h), or pass --ours-only")
        theirs = Reference(args)
    ours = Ours(args)
    sides = {"ours": ours} if theirs is None else {"ours": ours, "theirs": theirs}
    times = {(s, k): [] for s in sides for k in ("vanilla", "latent")}
    try:
        for r in range(args.rounds + 1):
            # The side that runs first in a round alternates: a step runs slower right after the
            # other process's step than after its own (caches, the other side's idle threads).
            order = list(sides.items())[:: 1 if r % 2 else -1]
            for k in ("latent", "vanilla"):
                for s, side in order:
                    t = side.step(k)
                    if r:  # the first round warms up
                        times[s, k].append(t)
    finally:
        if theirs is not None:
            theirs.close()
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"GPT-NeoX {args.num_layers} layers x {args.hidden_size}, vocab {args.vocab_size}, micro-batch "
          f"{args.micro_batch_size} x {args.seq_length}, {'bf16' if args.bf16 else 'fp32'} on {args.device}"
          f"{f', {args.threads} threads' if args.device == 'cpu' else ''}, N=1 J={args.jacobi}; "
          f"medians of {args.rounds} interleaved rounds")
    if theirs is not None:
        print(f"authors' side: {theirs.banner}")
    flop = ours.flop_ratio()
    print(f"{'side':<8}{'vanilla (s)':>12}{'latent (s)':>12}{'latent/vanilla':>16}{'FLOP ratio':>12}")
    for s in sides:
        v, lt = med[s, "vanilla"], med[s, "latent"]
        print(f"{s:<8}{v:>12.3f}{lt:>12.3f}{lt / v:>16.2f}{flop:>12.2f}")
    if theirs is not None:
        print(f"ours/theirs: vanilla {med['ours', 'vanilla'] / med['theirs', 'vanilla']:.3f}, "
              f"latent {med['ours', 'latent'] / med['theirs', 'latent']:.3f} (ratio of the medians)")
        # The two steps of a round ran seconds apart: their ratio cancels the machine's slow drifts.
        for k in ("vanilla", "latent"):
            r = sorted(a / b for a, b in zip(times["ours", k], times["theirs", k]))
            q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
            ci = median_interval(r)
            ci = f", 95% interval of the median {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
            print(f"  {k}: per-round ours/theirs median {q[1]:.3f}, quartiles {q[0]:.3f}-{q[2]:.3f}{ci}, "
                  f"ours faster in {sum(x < 1 for x in r)} of {len(r)} rounds")


if __name__ == "__main__":
    main()
