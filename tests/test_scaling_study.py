"""tools/scaling_study.py and its grid (analysis/scaling_grid.py): the plan, the dry run and its
Slurm array, bad input, and (slow) the quick mode end to end on a corpus built here."""

import dataclasses
import json
import os
import stat
import subprocess
import sys

import pytest

from megatron_latent.analysis import scaling_grid as grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "scaling_study.py")


def _tool(*argv, env=None):
    return subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def _flag(flags, name):
    return flags[flags.index(name) + 1] if name in flags else None


@pytest.mark.parametrize("ladder", sorted(grid.LADDERS))
def test_every_ladder_spans_ten_times_with_depth_and_width_grown_together(ladder):
    sizes = grid.LADDERS[ladder]
    assert len(sizes) >= 4
    params = [grid.size_config(z, 50304, 128).num_parameters(include_embeddings=False) for z in sizes]
    assert params[-1] / params[0] >= 10 and params == sorted(params)
    assert all(a.layers <= b.layers and a.hidden <= b.hidden for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1].layers > sizes[0].layers and sizes[-1].hidden > sizes[0].hidden


def test_plan_equal_tokens_and_equal_flops():
    s = grid.Settings(grid.LADDERS["cpu"], methods=grid.DEFAULT_METHODS + ("latent-N2",), seeds=(1, 2, 3),
                      tokens_per_param=10, budgets=("tokens", "flops"))
    runs = grid.plan(s)
    by = {(r.size.name, r.method, r.budget, r.seed): r for r in runs}
    # 5 sizes x (5 methods at equal tokens + 4 at equal FLOPs) x 3 seeds.
    assert len(runs) == 5 * 9 * 3 and len({r.name for r in runs}) == len(runs)
    for z in s.ladder:
        van = by[z.name, "vanilla", "tokens", 1]
        assert van.tokens >= 10 * van.params > van.tokens - 16 * 128
        for m in s.methods:
            r = by[z.name, m, "tokens", 2]
            # Same steps, batch, schedule, weight decay and seed at equal tokens: only the method differs.
            common = [f for f in ("--train-iters", "--global-batch-size", "--seq-length", "--lr", "--min-lr",
                                  "--lr-decay-style", "--weight-decay", "--hidden-size")]
            assert [_flag(r.flags, f) for f in common] == [_flag(van.flags, f) for f in common]
            assert "--init-method-std" not in r.flags and _flag(r.flags, "--seed") == "2"
            layers = int(_flag(r.flags, "--num-layers"))
            assert layers == (2 if m == "vanilla-2x-layers" else 1) * z.layers
            assert (_flag(r.flags, "--jacobi-grad-passes") == "2") == m.startswith("latent")
            if m != "vanilla":
                f = by[z.name, m, "flops", 1]
                # Training FLOPs within half a step of vanilla's; more steps exactly when cheaper per step.
                assert abs(f.steps * _step(f, s) - van.steps * _step(van, s)) <= _step(f, s) / 2
                assert (f.steps > r.steps) == (_step(r, s) < _step(van, s))
    assert by["L2-H32", "loop-K1", "tokens", 1].params == by["L2-H32", "vanilla", "tokens", 1].params
    assert by["L2-H32", "latent-N1", "tokens", 1].label == "latent-N1"
    assert by["L2-H32", "latent-N1", "flops", 1].label == "latent-N1 (equal FLOPs)"
    # Full backpropagation instead: no flag, more FLOPs per step.
    full = {(r.size.name, r.method): r for r in grid.plan(grid.Settings(grid.LADDERS["tiny"], grad_passes=None))}
    cheap = {(r.size.name, r.method): r for r in grid.plan(grid.Settings(grid.LADDERS["tiny"]))}
    for key, r in full.items():
        assert "--jacobi-grad-passes" not in r.flags
        assert (r.flops > cheap[key].flops) == (r.method == "latent-N1"), key


def test_every_run_builds_its_planned_model_through_the_pretrain_flags():
    from megatron_latent.training.arguments import model_config_from_args, parse_args

    for r in grid.plan(grid.Settings(grid.LADDERS["cpu"], methods=tuple(grid.METHODS))):
        args = parse_args([*r.flags, "--mock-data", "--vocab-size", str(r.cfg.vocab_size)])
        built = model_config_from_args(args)
        assert built.num_parameters(include_embeddings=False) == r.params, r.name
        assert (built.num_layers, built.hidden_size, built.query_groups, built.latent.method) == (
            r.cfg.num_layers, r.cfg.hidden_size, r.cfg.query_groups, r.cfg.latent.method), r.name


def _step(run, s):
    return s.global_batch_size * grid.mean_step_flops(run.cfg, s.seq_length)


def test_equal_flops_alone_still_plans_vanilla():
    runs = grid.plan(grid.Settings(grid.LADDERS["tiny"], seeds=(1,), budgets=("flops",)))
    assert sorted({(r.method, r.budget) for r in runs}) == [
        ("latent-N1", "flops"), ("loop-K1", "flops"), ("vanilla", "tokens"), ("vanilla-2x-layers", "flops")]


def test_plan_errors():
    with pytest.raises(ValueError, match="include vanilla"):
        grid.plan(grid.Settings(grid.LADDERS["tiny"], methods=("latent-N1",)))
    with pytest.raises(ValueError, match="unknown methods pause"):
        grid.plan(grid.Settings(grid.LADDERS["tiny"], methods=("vanilla", "pause")))


def test_dry_run_prints_the_plan_and_commands_and_a_working_slurm_array(tmp_path):
    sbatch = tmp_path / "study.sbatch"
    out = _tool("--ladder", "paper-llama", "--data-path", "/data/pile_text_document", "--tokenizer-model",
                "/data/tokenizer.json", "--vocab-size", "50277", "--seq-length", "2048", "--global-batch-size", "256",
                "--micro-batch-size", "8", "--pretrain-args=--bf16", "--tflops", "3200", "--gpus-per-run", "8",
                "--dry-run", "--slurm", str(sbatch), "--work", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "32 runs (16 settings x seeds)" in out.stdout and "at 3200 TFLOP/s per run (given)" in out.stdout
    assert "GPU-hours at 8 GPUs per run" in out.stdout
    cmds = [ln for ln in lines if ln.startswith("torchrun --standalone --nproc_per_node 8 -m megatron_latent.pretrain")]
    assert len(cmds) == 32 and all("--bf16" in c for c in cmds)
    assert not (tmp_path / "w").exists()  # a dry run writes nothing there

    # The array's task 5 runs the 6th command's flags, one srun task per GPU, with the signal handler.
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("srun", 'shift; SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=8 exec "$@"'),
                       ("python", 'printf "%s\\n" "$RANK/$WORLD_SIZE" "$@" > "$OUT_FILE"')):
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
        (fake / name).chmod(stat.S_IRWXU)
    got = tmp_path / "args.txt"
    r = subprocess.run(["bash", str(sbatch)], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "5",
                            "OUT_FILE": str(got)})
    assert r.returncode == 0, r.stderr
    want = cmds[5].split()[6:]
    assert got.read_text().split("\n")[:-1] == ["0/8", "-m", "megatron_latent.pretrain", *want, "--exit-signal-handler"]
    assert "#SBATCH --array=0-31" in sbatch.read_text()


def test_bad_input_is_one_line(tmp_path):
    r = _tool("--tiny", "--work", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("scaling_study.py: error: no data")
    r = _tool("--tiny", "--data-path", str(tmp_path / "none"), "--tokenizer-model", str(tmp_path / "t.json"),
              "--work", str(tmp_path / "w"))
    assert r.returncode == 2 and f"--data-path: no {tmp_path / 'none'}.idx" in r.stderr
    r = _tool("--tiny", "--corpus", str(tmp_path / "missing.jsonl"), "--work", str(tmp_path / "w"))
    assert r.returncode == 2 and f"--corpus: no such file or directory {tmp_path / 'missing.jsonl'}" in r.stderr
    r = _tool("--tiny", "--sizes", "L9-H999", "--corpus", "c.jsonl", "--dry-run")
    assert r.returncode == 2 and "--sizes: L9-H999 not in the ladder" in r.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 32 runs: about 5 minutes on 2 free cores, far more on a loaded machine
def test_tiny_study_end_to_end_and_resumed(tmp_path):
    from data_fixtures import make_texts, write_jsonl

    corpus = write_jsonl(str(tmp_path / "corpus.jsonl"), make_texts(3000, seed=3))
    work = tmp_path / "study"
    args = ("--tiny", "--corpus", corpus, "--vocab-size", "300", "--work", str(work), "--bootstrap", "50")
    first = _tool(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = (work / "results.md").read_text()
    assert "32 of 32 runs finished." in results
    assert results.count("(2 seeds)") == 16  # the compare_runs table: one row per size and method
    for method in ("latent-N1", "vanilla-2x-layers", "loop-K1"):
        assert results.count(f"| {method} | measured |") == 3  # one per axis
    assert (work / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.load(open(work / "runs" / "L1-H16-latent-N1-seed1" / "run.json"))
    assert run["flags"][run["flags"].index("--jacobi-grad-passes") + 1] == "2"
    # A rerun trains nothing and measures the plan's throughput on the finished runs.
    second = _tool(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("finished already") == 32 and "start " not in second.stdout
    assert "(measured on 32 runs)" in second.stdout
    # Another plan in the same directory is refused, not resumed.
    third = _tool(*args[:-2], "--bootstrap", "50", "--tokens-per-param", "6")
    assert third.returncode == 1 and "was started with other flags" in third.stderr


def test_a_changed_plan_is_refused_only_where_a_run_started(tmp_path):
    from megatron_latent.tools import scaling_study as tool

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    p, args = tool.parse_args(["--tiny", "--corpus", str(corpus), "--work", str(tmp_path)])
    runs = grid.plan(tool.settings(p, args))[:2]
    tool.check_run_flags(args, runs)
    other = [dataclasses.replace(r, flags=r.flags + ["--seed", "9"]) for r in runs]
    tool.check_run_flags(args, other)  # planned, never started: the new plan replaces the old
    recorded = json.load(open(tmp_path / "runs" / runs[0].name / "run.json"))["flags"]
    assert recorded[:len(other[0].flags)] == other[0].flags
    (tmp_path / "runs" / runs[0].name / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="was started with other flags"):
        tool.check_run_flags(args, runs)
