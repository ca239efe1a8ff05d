"""Checkpoints of a long run: retention deletes only what it may (and a kill while it deletes loses
nothing), extra save iterations, and every damaged checkpoint, lost tracker, bad dataset or full
disk stops the driver with one line on one rank naming the file, never a traceback or a silent
fresh start."""

import errno
import functools
import os
import shutil

import pytest

from multirank import run_on_ranks
from test_pretrain import TINY, _losses, _main, _runs, _tb

LATENT_ARGS = ["--num-latent-thoughts", "1", "--scale-embeddings"]
RUN = TINY + ["--mock-data", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4",
              "--lr", "1e-2"]


def _one_error_line(result):
    """The single `error:` line of a failed run, checked to come without a traceback."""
    code, _, err = result
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    return lines[0]


# ------------------------------------------------------------------------------ retention
def test_retention_policy():
    from megatron_latent.training.checkpointing import Retention

    its = [0, 1, 2, 3, 4, 6, 8, 10]
    assert Retention().to_delete(its, 10) == []  # the default keeps everything
    assert Retention(keep_last=2).to_delete(its, 10) == [0, 1, 2, 3, 4, 6]
    # Megatron-LM's --save-retain-interval alone: multiples of R and the newest.
    assert Retention(retain_interval=4).to_delete(its, 10) == [1, 2, 3, 6]
    assert Retention(keep_last=2, retain_interval=4, keep_iterations=frozenset({1, 3})).to_delete(its, 10) == [2, 6]
    # The tracker's iteration stays even when newer ones exist (e.g. one being published).
    assert Retention(keep_last=1).to_delete(its, 6) == [0, 1, 2, 3, 4, 8]


def _fake_checkpoints(root, iterations, tracker):
    from megatron_latent.checkpoint_layout import TRACKER, iteration_dir

    for i in iterations:
        os.makedirs(iteration_dir(root, i))
        for name in ("a.distcp", "b.distcp", "common.pt"):
            with open(os.path.join(iteration_dir(root, i), name), "w") as f:
                f.write("x")
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(f"{tracker}\n")


def test_a_kill_during_deletion_leaves_a_loadable_directory(tmp_path, monkeypatch):
    from megatron_latent.training import checkpointing as ck

    root = str(tmp_path)
    _fake_checkpoints(root, [2, 4, 6, 8], tracker=8)
    os.makedirs(os.path.join(root, "iter_0000010.tmp"))  # being written: never counted nor deleted
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):  # removes one file, then the process "dies"
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", lambda p, ignore_errors=False: killed(p)
                        if p.endswith(".deleting") and not ignore_errors else real_rmtree(p, ignore_errors=True))
    with pytest.raises(KeyboardInterrupt):
        ck.prune_checkpoints(root, ck.Retention(keep_last=2))
    # The half-deleted iteration is out of the iter_* namespace; the rest is as it was.
    assert ck.complete_iterations(root) == [4, 6, 8] and ck.find_resume_iteration(root) == (8, None)
    assert sorted(os.listdir(root)) == ["iter_0000002.deleting", "iter_0000004", "iter_0000006", "iter_0000008",
                                        "iter_0000010.tmp", "latest_checkpointed_iteration.txt"]
    monkeypatch.setattr(ck.shutil, "rmtree", real_rmtree)
    assert ck.prune_checkpoints(root, ck.Retention(keep_last=2)) == [4]  # and the leftover goes too
    assert sorted(os.listdir(root)) == ["iter_0000006", "iter_0000008", "iter_0000010.tmp",
                                        "latest_checkpointed_iteration.txt"]


def test_retention_and_extra_save_iterations_end_to_end(tmp_path):
    """Saves at 0 (the initial weights), 1, 3 (extra), every 2 and at the end; keeps the newest 2,
    every multiple of 4 and the extra ones; logs what it deleted; the run resumes from the result."""
    save = str(tmp_path / "ckpt")
    argv = RUN + ["--train-iters", "8", "--save", save, "--save-interval", "2", "--keep-last-n-checkpoints", "2",
                  "--save-retain-interval", "4", "--extra-save-iters", "0", "1", "3"]
    again = argv + ["--load", save, "--train-iters", "9", "--override-opt_param-scheduler"] + _tb(tmp_path, "tb")
    (code, out, err), resumed = run_on_ranks(_runs, 1, [argv, again])[0]
    assert code == 0, err[-2000:]
    from megatron_latent.training.checkpointing import complete_iterations, read_common

    # The first run saved 0 1 2 3 4 6 8 and deleted 2 at the save of 6 (not newest 2, nor extra, nor x4).
    assert "deleted the checkpoints of iterations 2 from" in out and out.count("deleted the") == 1
    assert read_common(save, 0)["iteration"] == 0
    assert resumed[0] == 0, resumed[2][-2000:]
    assert "at iteration 8" in resumed[1] and sorted(_losses(tmp_path, "tb")) == [9]
    assert "deleted the checkpoints of iterations 6 from" in resumed[1]
    assert complete_iterations(save) == [0, 1, 3, 4, 8, 9]


# ------------------------------------------------------------------------------ damaged checkpoints
def _damage(root, how):
    from megatron_latent.checkpoint_layout import TRACKER, iteration_dir

    it4 = iteration_dir(root, 4)
    if how == "no-tracker":
        os.remove(os.path.join(root, TRACKER))
    elif how == "garbage-tracker":
        open(os.path.join(root, TRACKER), "wb").write(b"\x00\xffgarbage\n")
    elif how == "tracker-names-missing":
        open(os.path.join(root, TRACKER), "w").write("6\n")
    elif how == "truncated-shard":
        shard = os.path.join(it4, "__0_1.distcp")
        os.truncate(shard, os.path.getsize(shard) // 2)
    elif how == "missing-shard":
        os.remove(os.path.join(it4, "__0_0.distcp"))
    else:  # a missing .metadata or common.pt
        os.remove(os.path.join(it4, how))


FAULTS = {  # damage -> what the one line says
    "garbage-tracker": "latest_checkpointed_iteration.txt: expected an iteration number, found",
    "tracker-names-missing": "names iteration 6, but",
    "truncated-shard": "iteration 4: {root}/iter_0000004/__0_1.distcp is truncated",
    "missing-shard": "iteration 4: {root}/iter_0000004/__0_0.distcp is missing",
    ".metadata": "iteration 4: {root}/iter_0000004/.metadata is missing",
    "common.pt": "iteration 4: {root}/iter_0000004/common.pt is missing",
}


def test_damaged_checkpoints_are_one_line_each(tmp_path):
    """Two ranks (DP=2) save iterations 2 and 4; each copy is damaged one way. A lost tracker
    resumes from the newest iteration with a warning; every other damage stops with one line on
    one rank naming the file (and how to fall back to iteration 2), exit status 2, and nothing in
    the directory changed. A fresh run into a directory with iterations is refused."""
    base = str(tmp_path / "base")
    argvs = [RUN + ["--train-iters", "4", "--save", base, "--save-interval", "2"]]
    roots = {}
    for how in ["no-tracker", *FAULTS]:
        roots[how] = str(tmp_path / how)
        argvs.append(RUN + ["--train-iters", "5", "--load", roots[how], "--save", roots[how],
                            "--override-opt_param-scheduler"])
    argvs.append(RUN + ["--train-iters", "5", "--save", base])  # no --load

    results = run_on_ranks(_runs_with_damage, 2, argvs, roots, base, timeout=600)
    first = results[0]
    assert first[0][0] == 0, first[0][2][-2000:]
    runs = dict(zip(["no-tracker", *FAULTS, "fresh"], first[1:]))
    code, out, err = runs["no-tracker"]
    assert code == 0 and "warning: --load" in err and "no latest_checkpointed_iteration.txt" in err, err[-2000:]
    assert "resuming from the newest, 4" in err and "at iteration 4" in out
    for how, needle in FAULTS.items():
        line = _one_error_line(runs[how])
        assert needle.format(root=roots[how]) in line, (how, line)
        assert runs[how][0] == 2
        if how not in ("garbage-tracker", "tracker-names-missing"):
            assert "write 2 into latest_checkpointed_iteration.txt" in line, line
    for rank_results in results[1:]:  # the other rank printed nothing
        assert all(not [x for x in r[2].splitlines() if x.startswith("error: ")] for r in rank_results[1:])
    line = _one_error_line(runs["fresh"])
    assert f"--save {base}: holds iterations 2, 4 past this run's start (0)" in line
    from megatron_latent.training.checkpointing import complete_iterations

    assert complete_iterations(base) == [2, 4]


def _runs_with_damage(argvs, roots, base):
    import torch.distributed as dist

    results = [_main(argvs[0])]
    if dist.get_rank() == 0:
        for how, root in roots.items():
            shutil.copytree(base, root)
            _damage(root, how)
    dist.barrier()
    return results + [_main(a) for a in argvs[1:]]


# ------------------------------------------------------------------------------ disk full
def _full_disk_runs(argv, small_argv):
    """The driver twice: with the checkpoint writer's file writes failing with ENOSPC from the
    second save on (in the forked writer processes too), then with 1000 bytes free."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_latent.training import checkpointing

    saves = {"n": 0, "fail_at": 2}
    real_save, real_write = checkpointing.dist_checkpointing.save, filesystem_async._write_item

    def counting_save(*a, **k):
        saves["n"] += 1
        return real_save(*a, **k)

    @functools.wraps(real_write)  # megatron inspects its signature
    def write_item(*a, **k):
        if saves["n"] >= saves["fail_at"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "__0_0.distcp")
        return real_write(*a, **k)

    checkpointing.dist_checkpointing.save = counting_save
    filesystem_async._write_item = write_item
    first = _main(argv)
    saves["fail_at"] = 10 ** 9
    real_usage = shutil.disk_usage
    checkpointing.shutil.disk_usage = lambda p: real_usage(p)._replace(free=1000)
    return first, _main(small_argv)


def test_a_full_disk_is_one_line_and_keeps_the_older_checkpoints(tmp_path):
    from megatron_latent.training.checkpointing import check_iteration, complete_iterations, read_latest_iteration

    save, small = str(tmp_path / "ckpt"), str(tmp_path / "small")
    argv = RUN + ["--train-iters", "4", "--save-interval", "2"]
    results = run_on_ranks(_full_disk_runs, 2, argv + ["--save", save], argv + ["--save", small], timeout=300)
    line = _one_error_line(results[0][0])
    assert results[0][0][0] == 1 and results[1][0][0] == 1
    assert "writing iteration 4 failed: No space left on device" in line and "iteration 2, is intact" in line, line
    assert complete_iterations(save) == [2] and read_latest_iteration(save) == 2 and not os.path.exists(
        os.path.join(save, "iter_0000004.tmp"))
    check_iteration(save, 2)
    # Too little free space for the first save is found before anything is written.
    line = _one_error_line(results[0][1])
    assert "not enough free space for iteration 2: 1e-06 GB free" in line and "nothing was written" in line, line
    assert complete_iterations(small) == [] and results[1][1][0] == 1


# ------------------------------------------------------------------------------ bad datasets
def _dataset(prefix, documents):
    from megatron_latent.data.indexed import CompactIndexedDatasetBuilder

    builder = CompactIndexedDatasetBuilder(prefix + ".bin")
    builder.add_documents(documents)
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from data_fixtures import train_hf_bpe

    return train_hf_bpe(str(tmp_path_factory.mktemp("tok")))


@pytest.mark.slow  # two ranks, four datasets, data-loader workers: about 40 s
def test_bad_datasets_are_one_line_each(tmp_path, tokenizer_file):
    """Two ranks (DP=2). A short .bin and a damaged .idx stop before the first step; a token id
    past the vocabulary in one document stops the step whose batch holds it, on both ranks
    although only one of them read it, with one line naming the .bin."""
    import numpy

    rng = numpy.random.default_rng(0)
    docs = [list(rng.integers(0, 300, size=int(rng.integers(20, 60)))) for _ in range(60)]
    prefixes = {}
    for how in ("short-bin", "bad-header", "bad-body", "token-past-vocab"):
        bad_docs = [d + [5000] if how == "token-past-vocab" and i == 17 else d for i, d in enumerate(docs)]
        prefixes[how] = p = _dataset(str(tmp_path / how), bad_docs)
        if how == "short-bin":
            os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 40)
        elif how == "bad-header":
            with open(p + ".idx", "r+b") as f:
                f.write(b"GARBAGE!!")
        elif how == "bad-body":
            with open(p + ".idx", "r+b") as f:
                f.seek(40)
                f.write(b"\xff" * 64)
    common = TINY + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_file,
                     "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--split", "1,0,0",
                     "--train-iters", "30", "--num-workers", "1"]
    results = run_on_ranks(_runs, 2, [common + ["--data-path", p] for p in prefixes.values()], timeout=300)
    lines = dict(zip(prefixes, map(_one_error_line, results[0])))
    assert all(r[0] != 0 for r in results[1])  # every rank stopped
    assert f"--data-path: {prefixes['short-bin']}.bin:" in lines["short-bin"] and "the index describes" in lines[
        "short-bin"]
    assert f"{prefixes['bad-header']}.idx: not a megatron indexed-dataset index" in lines["bad-header"]
    assert f"--data-path: {prefixes['bad-body']}.idx:" in lines["bad-body"]
    assert (f"{prefixes['token-past-vocab']}.bin: token id 5000 >= the model's vocabulary size"
            in lines["token-past-vocab"]), lines["token-past-vocab"]


# ------------------------------------------------------------------------------ the Pythia recipe
def _recipe_flags(**env):
    """The flags examples/pretrain_pythia_latent.sh hands the trainer (its launcher replaced by echo)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, LAUNCHER="srun", PYTHON="echo", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1",
               MASTER_ADDR="localhost", DATA="d", TOKENIZER="t.json", CKPT="c", **env)
    out = subprocess.run(["bash", os.path.join(root, "examples", "pretrain_pythia_latent.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["-m", "megatron_latent.pretrain"]
    from megatron_latent.training.arguments import parse_args

    return parse_args(out[2:])


def test_the_pythia_recipe_saves_at_pythia_checkpoint_steps():
    """Pythia's 154 public checkpoints: step 0, 1, 2, 4, ..., 512, and every 1,000 to 143,000."""
    args = _recipe_flags()
    saved = {0} | set(args.extra_save_iters) | set(range(args.save_interval, args.train_iters + 1, args.save_interval))
    pythia = {0} | {2 ** k for k in range(10)} | set(range(1000, 143001, 1000))
    assert saved == pythia and len(pythia) == 154
    assert args.keep_last_n_checkpoints is None and args.save_retain_interval is None  # all kept
    args = _recipe_flags(KEEP="2", RETAIN="10000")
    assert (args.keep_last_n_checkpoints, args.save_retain_interval) == (2, 10000)


# ------------------------------------------------------------------------------ optimizer state across layouts
def _continue_at_layouts(save, argvs):
    import torch.distributed as dist

    first = _main(argvs[0])
    out = [first]
    for argv in argvs[1:]:
        dist.barrier()
        out.append(_main(argv))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [["--use-distributed-optimizer"], [],
                                       ["--use-distributed-optimizer", "--thought-input", "interpolated"]],
                         ids=["distributed", "adam", "interpolated"])
def test_optimizer_state_follows_the_layout(tmp_path, optimizer):
    """Saved at TP=2 after 3 steps, continued for 2 at TP=2, PP=2 and DP=2: the Adam moments and
    steps, scheduler and data position carry over, so the continuations' losses agree to fp32
    tolerance; continuing with fresh moments (--no-load-optim) visibly differs."""
    save = str(tmp_path / "ckpt")
    common = TINY + ["--num-latent-thoughts", "1", "--scale-embeddings", "--mock-data", "--seq-length", "16",
                     "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-2", "--jacobi-iters", "2",
                     "2", "--lr-warmup-iters", "0"] + optimizer
    resume = common + ["--load", save, "--train-iters", "5"]
    layouts = {"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"],
               "dp2": [], "fresh": ["--tensor-model-parallel-size", "2", "--no-load-optim"]}
    argvs = [common + ["--tensor-model-parallel-size", "2", "--train-iters", "5", "--save", save,
                       "--exit-interval", "3"]]
    argvs += [resume + extra + _tb(tmp_path, name) for name, extra in layouts.items()]
    results = run_on_ranks(_continue_at_layouts, 2, save, argvs, timeout=600)[0]
    for r in results:
        assert r[0] == 0, r[2][-3000:]
    losses = {name: _losses(tmp_path, name) for name in layouts}
    assert sorted(losses["tp2"]) == [4, 5]
    for name in ("pp2", "dp2"):
        for step in (4, 5):
            assert losses[name][step] == pytest.approx(losses["tp2"][step], rel=1e-5, abs=1e-5), (name, losses)
    # Same weights, so the same loss at 4; fresh moments step elsewhere at 4, which shows at 5.
    assert losses["fresh"][4] == pytest.approx(losses["tp2"][4], rel=1e-5)
    assert abs(losses["fresh"][5] - losses["tp2"][5]) > 1e-3, losses


# ------------------------------------------------------------------------------ asynchronous save
@pytest.mark.slow
def test_async_save_resumes_exactly(tmp_path):
    """--async-save every 2 steps while training goes on, stopped by --exit-interval at 4 (which
    waits for the save of 4); resumed from iteration 2, written while steps 3 and 4 ran, to 5: the
    uninterrupted run's losses (DP=2, distributed optimizer)."""
    save = str(tmp_path / "ckpt")
    common = RUN + LATENT_ARGS + ["--train-iters", "5", "--use-distributed-optimizer", "--jacobi-iters", "1", "3"]
    runs = run_on_ranks(_runs_resuming_from_2, 2, save, [
        common + _tb(tmp_path, "a"),
        common + _tb(tmp_path, "b") + ["--save", save, "--save-interval", "2", "--exit-interval", "4",
                                       "--async-save"],
        common + _tb(tmp_path, "c") + ["--load", save, "--save", save, "--async-save"],
    ], timeout=600)[0]
    assert [r[0] for r in runs] == [0, 0, 0], runs[1][2][-3000:] + runs[2][2][-3000:]
    out = runs[1][1]
    assert "saving checkpoint of iteration 2" in out and "the checkpoint of iteration 4 in" in out, out
    assert "at iteration 2" in runs[2][1]
    full, first, rest = (_losses(tmp_path, run) for run in "abc")
    assert sorted(first) == [1, 2, 3, 4] and sorted(rest) == [3, 4, 5]
    for step in range(1, 6):
        assert first.get(step, rest.get(step)) == full[step], step
        assert rest.get(step, full[step]) == full[step], step
    from megatron_latent.training.checkpointing import complete_iterations, read_latest_iteration

    assert read_latest_iteration(save) == 5 and complete_iterations(save) == [2, 5]


def _runs_resuming_from_2(save, argvs):
    """Run argvs[0] and [1]; then drop iteration 4 so that argvs[2] resumes from 2."""
    import torch.distributed as dist

    from megatron_latent.checkpoint_layout import TRACKER, iteration_dir

    results = [_main(a) for a in argvs[:2]]
    if dist.get_rank() == 0:
        shutil.rmtree(iteration_dir(save, 4))
        open(os.path.join(save, TRACKER), "w").write("2\n")
    dist.barrier()
    return results + [_main(argvs[2])]


# ------------------------------------------------------------------------------ kill -9 during saves
@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--async-save"]], ids=["sync", "async"])
def test_kill_9_during_saves_loses_nothing(tmp_path, mode):
    """A run saving at every step is killed (SIGKILL to every process of the job) at random
    moments of its saves, three times, and restarted with the same command each time: every
    loss any attempt logged equals the uninterrupted run's, and the run ends complete."""
    import random
    import signal
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    save = str(tmp_path / "ckpt")
    argv = RUN + LATENT_ARGS + ["--train-iters", "12", "--use-distributed-optimizer", "--hidden-size", "128",
                                "--ffn-hidden-size", "256"]
    command = [sys.executable, "-m", "megatron_latent.pretrain", *argv]
    done = subprocess.run(command + _tb(tmp_path, "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = _losses(tmp_path, "ref")
    rng = random.Random(0)
    resumable = command + ["--save", save, "--load", save, "--save-interval", "1", *mode]
    for attempt in range(4):
        proc = subprocess.Popen(resumable + _tb(tmp_path, f"run{attempt}"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            if attempt < 3:
                target = 3 * attempt + 2  # kill somewhere in a later save each time
                for line in proc.stdout:
                    if "checkpoint of iteration" in line and int(line.split("iteration ")[1].split()[0]) >= target:
                        break
                time.sleep(rng.uniform(0.0, 1.5))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            else:
                out, _ = proc.communicate(timeout=600)
                assert proc.returncode == 0, out[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert not [d for d in os.listdir(save) if d.endswith(".deleting")]
        for step, loss in _losses(tmp_path, f"run{attempt}").items():
            assert loss == reference[step], (attempt, step, loss, reference[step])
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "12"
