"""One saved iteration exported to Hugging Face and scored by lm-evaluation-harness: the worker the
training loop's downstream evaluation (training/downstream.py) runs in a background process.

    python -m megatron_latent.hf.downstream_eval --load CKPT --iteration K --tasks piqa,sciq \
        --tokenizer-model tokenizer.json --output results.json [--limit 100] [--device cuda]

writes {"<task>/<metric>": value, ...} (metrics as lm-eval names them, filters other than `none`
appended: acc, acc_norm, acc_stderr, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional

from megatron_latent.training.downstream import flatten_results, resolve_tasks


def evaluate_checkpoint(load: str, iteration: int, tasks: str, work_dir: str, tokenizer_model: str,
                        limit: Optional[float] = None, device: str = "cpu", batch_size: str = "8") -> Dict[str, float]:
    """Export iteration `iteration` of `load` into `work_dir`/hf and evaluate it with lm-eval."""
    names, include = resolve_tasks(tasks)
    for name, path in (("load", load), ("tokenizer_model", tokenizer_model)):
        if not os.path.exists(path):  # before the slow imports
            raise FileNotFoundError(f"{name}={path}: no such file or directory")
    from megatron_latent.hf.export import export_to_hf

    hf_dir = os.path.join(work_dir, "hf")
    export_to_hf(load, hf_dir, iteration=iteration, tokenizer_model=tokenizer_model, force=True)
    from lm_eval import simple_evaluate  # slow to import: after the export has succeeded
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
                          tasks=names, task_manager=TaskManager(include_path=include), batch_size=batch_size,
                          device=device, limit=limit)
    return flatten_results(res["results"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True)
    p.add_argument("--iteration", type=int, required=True)
    p.add_argument("--tasks", required=True, help="paper, a directory of task YAMLs, or names")
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--output", required=True, help="results JSON, written when the evaluation succeeded")
    p.add_argument("--work-dir", default=None, help="where the export goes (default: beside --output)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction when < 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", default="8")
    args = p.parse_args(argv)
    try:
        values = evaluate_checkpoint(args.load, args.iteration, args.tasks,
                                     args.work_dir or os.path.dirname(os.path.abspath(args.output)),
                                     args.tokenizer_model, args.limit, args.device, args.batch_size)
    except Exception as e:  # noqa: BLE001  (the training log shows this one line)
        from megatron_latent.cli import flag_message

        table = None
        if "megatron.core" in sys.modules:  # the flag table's module imports it: only once the export has
            from megatron_latent.training.arguments import LIBRARY_FLAGS as table
        message = flag_message(e, p, table)
        print(f"error: {type(e).__name__}: {message}".replace("\n", " "), file=sys.stderr)
        return 1
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(values, f, indent=1)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # guard: megatron's checkpoint code may start spawn processes
    sys.exit(main())
