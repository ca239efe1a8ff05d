"""Pipeline bubble of the latent forward: step time at PP (default 2) versus the ideal, and the
activation memory each stage holds, for several micro-batch counts.

    python benchmarks/bench_pipeline.py [--pipeline-model-parallel-size 2] [--micro-batches 4 8 16]

For each micro-batch count M it times forward+backward of one step (all N + J + 1 passes, as
virtual pipeline chunks) on one rank (PP=1) and on PP ranks, and prints

* ideal = T(PP=1) / PP: perfect split, no bubble, free communication;
* overhead = T(PP) / ideal - 1, beside the interleaved schedule's bubble (PP - 1) / (V * M) with
  V = N + J + 1 chunks (the passes);
* per stage: the share of the step's wall time the rank's process spent computing (CPU time / wall
  time; on CPU, gloo waits sleep), and the peak bytes of activations saved for backward (all
  passes of the micro-batches in flight; benchmarks/activation_memory.py), and at PP=1 for comparison.

Ranks are processes on this machine (gloo on CPU, one thread each); on a shared machine the
measured overhead includes whatever else runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _rank_main(rank, world, init_file, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist
    from activation_memory import SavedActivationMeter  # benchmarks/, beside this script
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig

    import megatron_latent  # noqa: F401  (CPU backend when CUDA is absent)
    from megatron_latent.config import LatentSettings, ModelConfig
    from megatron_latent.parallel.initialize import initialize_model_parallel
    from megatron_latent.parallel.pipeline import build_latent_pipeline, latent_forward_backward
    from megatron_latent.platform import distributed_backend
    from megatron_latent.training import engine
    from megatron_latent.training.engine import latent_forward_step

    torch.set_num_threads(args.threads)
    dist.init_process_group(distributed_backend(), init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = ModelConfig(
        name="bench", arch=args.arch, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=4 * args.hidden_size,
        vocab_size=args.vocab_size, seq_length=args.seq_length,
        latent=LatentSettings(args.num_latent_thoughts, (args.jacobi_iters,) * 2 if args.num_latent_thoughts else None,
                              scale_embeddings=True),
    )
    initialize_model_parallel(1, world, model=cfg)
    model = engine.wrap_ddp(build_latent_pipeline(cfg), DistributedDataParallelConfig())
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    L, b = args.seq_length, args.micro_batch_size

    def batches(m):
        g = torch.Generator().manual_seed(m)
        out = []
        for _ in range(m):
            t = torch.randint(0, args.vocab_size, (b, L + 1), generator=g).to(device)
            out.append({"tokens": t[:, :-1], "labels": t[:, 1:],
                        "position_ids": torch.arange(L, device=device).expand(b, L)})
        return out

    results = {}
    for m in args.micro_batches:
        times, cpu, peak = [], [], 0
        for it in range(args.iters + 1):
            for c in model:
                c.zero_grad_buffer()
            data = batches(m)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            with SavedActivationMeter(p for c in model for p in c.parameters()) as meter:
                latent_forward_backward(
                    forward_step_func=latent_forward_step(args.jacobi_iters), data_iterator=iter(data), model=model,
                    num_microbatches=m, seq_length=L, micro_batch_size=b, num_jacobi_iters=args.jacobi_iters,
                )
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dist.barrier()
            if it:  # the first step warms up
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            peak = max(peak, meter.peak_bytes)
        results[m] = (statistics.median(times), peak, statistics.median(cpu))
    queue.put((rank, ps.get_pipeline_model_parallel_rank(), results))
    dist.barrier()
    dist.destroy_process_group()


def _run(world, args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdzv"), args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        out = [queue.get() for _ in procs]
        for p in procs:
            p.join()
    return {stage: res for _, stage, res in sorted(out)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=2)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--arch", default="llama", choices=["gpt2", "gpt-neox", "llama"])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--num-latent-thoughts", type=int, default=1)
    p.add_argument("--jacobi-iters", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = p.parse_args()

    pp = args.pipeline_model_parallel_size
    passes = (args.num_latent_thoughts + args.jacobi_iters + 1) if args.num_latent_thoughts else 1
    one = _run(1, args)[0]
    staged = _run(pp, args)
    mib = 1 / 2**20
    print(f"{args.arch} layers={args.num_layers} hidden={args.hidden_size} L={args.seq_length} "
          f"mbs={args.micro_batch_size} N={args.num_latent_thoughts} J={args.jacobi_iters}: "
          f"{passes} passes = virtual chunks per stage")
    head = (f"{'M':>3} {'PP=1 (s)':>9} {f'PP={pp} (s)':>9} {'ideal (s)':>9} {'overhead':>8} {'bubble':>7} "
            f"{'PP=1 act MiB':>12}")
    head += "".join(f" {f'stage{s} busy':>11}" for s in range(pp))
    head += "".join(f" {f'stage{s} MiB':>10}" for s in range(pp))
    print(head)
    for m in args.micro_batches:
        t1, mem1, _ = one[m]
        tp = max(staged[s][m][0] for s in staged)
        ideal = t1 / pp
        bubble = (pp - 1) / (passes * m) if passes > 1 else (pp - 1) / m
        row = f"{m:>3} {t1:>9.3f} {tp:>9.3f} {ideal:>9.3f} {tp / ideal - 1:>8.1%} {bubble:>7.1%} {mem1 * mib:>12.1f}"
        row += "".join(f" {staged[s][m][2] / staged[s][m][0]:>11.0%}" for s in range(pp))
        row += "".join(f" {staged[s][m][1] * mib:>10.1f}" for s in range(pp))
        print(row)


if __name__ == "__main__":
    main()
