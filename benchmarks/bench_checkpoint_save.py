"""Measure what a checkpoint save costs: the time training is blocked by each save, the bytes
written, bytes per parameter and the write rate; with the trainer's --async-save also the step
time of the steps that overlap the background write, beside the step time without a save. The
model, layout and optimizer come from the training driver's own flags (after `--`); `--save` must
name a scratch directory. Compare a run with and without --async-save:

    python benchmarks/bench_checkpoint_save.py --saves 3 -- --mock-data --model-preset pythia-160m \
        --use-distributed-optimizer --save /tmp/bench_ckpt [--async-save]
    torchrun --nproc_per_node 2 benchmarks/bench_checkpoint_save.py -- --tensor-model-parallel-size 2 ...

Run it on an otherwise idle machine: on a shared one the numbers mean little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saves", type=int, default=3, help="saves to time")
    p.add_argument("--steps", type=int, default=3, help="steps timed without a save before each save")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="-- then the flags of megatron_latent.pretrain")
    args = p.parse_args(argv)
    flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags

    import torch.distributed as dist

    from megatron_latent import pretrain
    from megatron_latent.parallel.initialize import destroy_process_group
    from megatron_latent.training import loop
    from megatron_latent.training.arguments import parse_args
    from megatron_latent.training.checkpointing import iteration_dir

    targs = parse_args(flags + ["--train-iters", "100000", "--eval-iters", "0"])
    if not targs.save:
        p.error("give the trainer a scratch --save directory")
    if os.path.isdir(targs.save) and os.listdir(targs.save):
        p.error(f"--save {targs.save} is not empty; give a scratch directory")
    plan = pretrain.configure(targs)
    trainer = pretrain.build_trainer(targs, plan, reporter=True)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    params = plan.cfg.num_parameters()
    trainer.settings.save = None  # the loop only steps; the saves are timed here
    background = trainer.background_saves

    def step() -> float:
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        trainer.settings.train_iters = trainer.state.iteration + 1
        # One step; train() would wait for a background save at its end, so the poll that a
        # longer run makes after each step is made here instead.
        trainer.background_saves = None
        loop.train(trainer)
        trainer.background_saves = background
        if background is not None:
            background.poll()
        return time.perf_counter() - t0

    step()  # allocates the optimizer state; its one-time costs are not timed
    for i in range(args.saves):
        plain = [step() for _ in range(args.steps)]
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        trainer.save(trainer.state)
        blocked = time.perf_counter() - t0
        overlapped = []
        while background is not None and background.pending is not None and len(overlapped) < 1000:
            overlapped.append(step())
        path = iteration_dir(targs.save, trainer.state.iteration - len(overlapped))
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        if rank0:
            line = (f"save {i + 1}: blocked {blocked:.3f} s | {size / 1e9:.3f} GB, {size / params:.2f} bytes/parameter "
                    f"({params:,} parameters) | step {1000 * sum(plain) / len(plain):.1f} ms without a save")
            if overlapped:
                line += (f", {1000 * sum(overlapped) / len(overlapped):.1f} ms over the {len(overlapped)} steps "
                         f"overlapping the background write")
            print(line, flush=True)
    if rank0:
        shutil.rmtree(targs.save, ignore_errors=True)
    trainer.metrics.close()
    destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
