"""Measure what a checkpoint save costs: the time training is blocked by each save, the bytes
written, bytes per parameter and the write rate. The model, layout and optimizer come from the
training driver's own flags (after `--`); `--save` must name a scratch directory.

    python tools/bench_checkpoint_save.py --saves 3 -- --mock-data --model-preset pythia-160m \
        --use-distributed-optimizer --save /tmp/bench_ckpt
    torchrun --nproc_per_node 2 tools/bench_checkpoint_save.py -- --tensor-model-parallel-size 2 ...

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
    p.add_argument("--saves", type=int, default=3, help="saves to time (one train step before each)")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="-- then the flags of megatron_latent.pretrain")
    args = p.parse_args(argv)
    flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags

    import torch.distributed as dist

    from megatron_latent import pretrain
    from megatron_latent.training import loop
    from megatron_latent.training.arguments import parse_args
    from megatron_latent.training.checkpointing import iteration_dir

    targs = parse_args(flags + ["--train-iters", str(args.saves), "--eval-iters", "0"])
    if not targs.save:
        p.error("give the trainer a scratch --save directory")
    if os.path.isdir(targs.save) and os.listdir(targs.save):
        p.error(f"--save {targs.save} is not empty; give a scratch directory")
    plan = pretrain.configure(targs)
    trainer = pretrain.build_trainer(targs, plan, reporter=True)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    params = plan.cfg.num_parameters()
    trainer.settings.save = None  # the loop only steps; the saves are timed here
    for i in range(args.saves):
        # One step so that the optimizer state exists and changes between saves.
        trainer.settings.train_iters = i + 1
        loop.train(trainer)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        trainer.save(trainer.state)
        blocked = time.perf_counter() - t0
        path = iteration_dir(targs.save, trainer.state.iteration)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        if rank0:
            print(f"save {i + 1}: blocked {blocked:.3f} s | {size / 1e9:.3f} GB, {size / params:.2f} bytes/parameter "
                  f"({params:,} parameters) | {size / 1e9 / blocked:.3f} GB/s", flush=True)
    if rank0:
        shutil.rmtree(targs.save, ignore_errors=True)
    trainer.metrics.close()
    pretrain._leave_world_of_one()
    return 0


if __name__ == "__main__":
    sys.exit(main())
