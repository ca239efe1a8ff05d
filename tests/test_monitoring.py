"""What a run shows while it trains: the Weights & Biases run (offline), Megatron's diagnostics
(weights norm, memory, profiler trace) and the thoughts' own signals."""

import glob
import json
import os

import pytest

from multirank import run_on_ranks
from test_pretrain import _runs

TINY = ["--model-preset", "tiny-llama", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-workers", "0", "--lr-warmup-fraction", "0", "--mock-data", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2"]
LATENT = ["--num-latent-thoughts", "1", "--scale-embeddings"]




def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def wandb_history(run_file):
    """({step: {key: value}}, config) of what an offline W&B run file (`run-<id>.wandb`) holds. The file is a
    LevelDB-style log of protobuf records: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (checksum, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    history, config, pos, block, buf = {}, {}, 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "run":
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            if record.WhichOneof("record_type") == "history":
                row = history.setdefault(record.history.step.num, {})
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        row[key] = json.loads(item.value_json)
    return history, config


def test_wandb_offline_logs_every_metric_and_resumes_the_same_run(tmp_path, monkeypatch):
    """Every scalar of metrics.jsonl reaches the offline W&B run at the same step; a restart resumes
    the run id kept in --save, and steps an interrupted job already logged are not logged again."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    base = TINY + LATENT + ["--save", save, "--tensorboard-dir", tb, "--wandb-project", "p",
                            "--wandb-exp-name", "tiny", "--eval-iters", "1", "--eval-interval", "2",
                            "--save-interval", "2", "--log-params-norm", "--log-memory-to-tensorboard",
                            "--train-iters", "4"]
    first, = run_on_ranks(_runs, 1, [base + ["--exit-interval", "2"]])[0]
    assert first[0] == 0 and "W&B did not start" not in first[2], first[2][-3000:]
    state = json.load(open(os.path.join(save, "wandb_run.json")))
    assert state["last_step"] == 2
    # As if the job had logged step 3 and then died before its next checkpoint.
    json.dump({**state, "last_step": 3}, open(os.path.join(save, "wandb_run.json"), "w"))
    second, = run_on_ranks(_runs, 1, [base + ["--load", save]])[0]
    assert second[0] == 0, second[2][-3000:]

    runs = sorted(glob.glob(os.path.join(save, "wandb", "wandb", "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + state["id"]) for r in runs)
    logged, configs = zip(*[wandb_history(os.path.join(r, f"run-{state['id']}.wandb")) for r in runs])
    assert configs[0]["layout"] == "TP=1 PP=1 DP=1 VPP=1" and configs[0]["wandb_exp_name"] == "tiny"
    assert configs[0]["model_settings"].startswith("N=1 latent thoughts") and configs[1]["load"] == save, configs[0]
    assert sorted(logged[0]) == [1, 2] and sorted(logged[1]) == [4]
    wandb_rows = {**logged[0], **logged[1]}
    jsonl = {}
    for r in _records(os.path.join(tb, "metrics.jsonl")):
        jsonl.setdefault(r.pop("iteration"), {}).update(r)
    assert sorted(jsonl) == [1, 2, 3, 4]
    for step in (1, 2, 4):
        assert wandb_rows[step] == pytest.approx(jsonl[step]), step
    assert {"train/loss", "valid/loss", "train/params_norm", "memory/peak_rss_bytes"} <= set(wandb_rows[2])


def test_wandb_without_the_package_is_one_line(monkeypatch, capsys):
    import sys

    from megatron_latent.training.arguments import parse_args

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit):
        parse_args(["--mock-data", "--save", "x", "--wandb-project", "p"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--wandb-project needs the wandb package: pip install 'megatron-latent[wandb]'" in err[-1]


# ------------------------------------------------------------------------------ diagnostics
def test_profile_writes_a_trace_and_memory_and_params_norm_are_logged(tmp_path):
    tb = str(tmp_path / "tb")
    argv = TINY + ["--tensorboard-dir", tb, "--eval-iters", "0", "--train-iters", "4", "--profile",
                   "--profile-step-start", "2", "--profile-step-end", "4", "--log-memory-to-tensorboard",
                   "--log-params-norm", "--log-throughput", "--use-pytorch-profiler"]
    (code, out, err), = run_on_ranks(_runs, 1, [argv])[0]
    assert code == 0, err[-3000:]
    traces = glob.glob(os.path.join(tb, "*.pt.trace.json"))
    assert len(traces) == 1 and "profiled steps 2..3" in out
    events = json.load(open(traces[0]))["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
    assert any(e.get("name", "").startswith("ProfilerStep#") for e in events)
    records = _records(os.path.join(tb, "metrics.jsonl"))
    assert all(r["memory/peak_rss_bytes"] > 1e7 and r["train/params_norm"] > 0 for r in records)
    assert "params norm" in out


@pytest.mark.parametrize("argv, needle", [
    (["--profile"], "--profile needs --tensorboard-dir"),
    (["--profile", "--tensorboard-dir", "x", "--profile-step-start", "3", "--profile-step-end", "3"],
     "need 1 <= start < end"),
    (["--wandb-project", "p"], "--wandb-project needs --save or --wandb-save-dir"),
])
def test_bad_monitoring_flags_stop_the_parser(argv, needle, capsys):
    from megatron_latent.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--mock-data"] + argv)
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------------ the passes' signals
def _signals(cfg, j, tp, pp):
    """One training step at J=`j` with the monitor on: its values, and the norm of the full weights
    after the step (the oracle of train/params_norm)."""
    import math

    import pipeline_cases as pc
    from megatron_latent.training.engine import latent_train_step
    from megatron_latent.training.monitoring import Monitor

    dp, model, opt = pc.setup(cfg, tp, pp)
    monitor = Monitor(params_norm=True, thought_stats=True)
    monitor.step_begins(model, 1, log=True)
    batches = pc.step_batches(0, dp)
    latent_train_step(model, opt, iter(batches), len(batches), pc.L, pc.MBS, j)
    monitor.step_ends(model, 1)
    values = monitor.values(model)
    weights = pc.merged(model, grads=False)
    return values, math.sqrt(sum(float(w.double().pow(2).sum()) for w in weights.values()))


def _signal_cases(cases):
    import pipeline_cases as pc

    cfgs = {"latent": pc.tiny_cfg(n=2), "interpolated": pc.method_cfg("interpolated"), "loop": pc.method_cfg("loop")}
    return {(method, tp, pp): _signals(cfgs[method], 2, tp, pp) for method, tp, pp in cases}


def test_signals_and_params_norm_agree_across_layouts():
    """The passes' signals of one step and the weights' norm after it are the same at TP=2 and PP=2 as
    on one rank (the thought columns live on the first pipeline stage; the loss on the last), and the
    weights' norm is that of the gathered full weights."""
    methods = ("latent", "interpolated", "loop")
    one = run_on_ranks(_signal_cases, 1, [(m, 1, 1) for m in methods])[0]
    two = run_on_ranks(_signal_cases, 2, [(m, 1, 2) for m in methods] + [("latent", 2, 1)])[0]
    expected_keys = {"latent": {"thoughts/jacobi_residual_1", "thoughts/jacobi_residual_2",
                                "thoughts/jacobi_max_change_2", "thoughts/input_norm_ratio"},
                     "interpolated": {"thoughts/jacobi_residual_2", "thoughts/mixing_entropy"},
                     "loop": {"loops/change_1", "loops/change_2"}}
    for (method, tp, pp), (values, full_norm) in {**one, **two}.items():
        assert values["train/params_norm"] == pytest.approx(full_norm, rel=1e-6), (method, tp, pp)
        assert expected_keys[method] <= set(values), (method, sorted(values))
        reference = one[(method, 1, 1)][0]
        assert set(values) == set(reference)
        for k, v in values.items():
            assert v == pytest.approx(reference[k], rel=1e-4, abs=1e-6), (method, tp, pp, k)


def test_jacobi_residuals_are_the_change_between_consecutive_passes(single_rank):
    """The recorded residual of Jacobi iteration i is ||T_i - T_(i-1)|| / ||T_(i-1)|| of the thought
    columns the model's pass loop returns after i and i-1 Jacobi passes; the input norms are those
    of the final pass's columns."""
    import torch

    from megatron_latent.models.pass_stats import PassStats
    from megatron_latent.models.transformer_config import to_transformer_config
    from megatron_latent.parallel.pipeline import build_latent_pipeline
    from parallel_utils import batch, init_weights
    from pipeline_cases import L, tiny_cfg

    cfg = tiny_cfg(n=2)
    model, = build_latent_pipeline(cfg, to_transformer_config(cfg, 1, 1))
    init_weights([model])
    model.eval()
    b = batch(0, 2, L)
    model.pass_stats = stats = PassStats()
    with torch.no_grad():
        model(b["tokens"], b["position_ids"], None, num_jacobi_iters=3)
    model.pass_stats = None
    got = PassStats.reduce([stats])
    with torch.no_grad():
        tokens, pos = model.token_inputs(b["tokens"], b["position_ids"])
        thoughts = [torch.stack(model.solve_thoughts(tokens, pos, b["position_ids"], None, j)[0][1:]).double()
                    for j in range(4)]
    for i in (1, 2, 3):
        change = thoughts[i] - thoughts[i - 1]
        assert got[f"thoughts/jacobi_residual_{i}"] == pytest.approx(float(change.norm() / thoughts[i - 1].norm()),
                                                                      rel=1e-6)
        assert got[f"thoughts/jacobi_max_change_{i}"] == pytest.approx(float(change.abs().max()), rel=1e-6)
    assert "thoughts/jacobi_residual_4" not in got
    token_rms = float(tokens.double().pow(2).sum(-1).mean().sqrt())
    thought_rms = float(thoughts[3].pow(2).sum(-1).mean().sqrt())
    assert got["thoughts/token_input_rms"] == pytest.approx(token_rms, rel=1e-6)
    assert got["thoughts/input_norm_ratio"] == pytest.approx(thought_rms / token_rms, rel=1e-6)


@pytest.mark.parametrize("topk", [0, 5])
def test_mixing_entropy_is_the_softmax_entropy(single_rank, topk):
    """The entropy handed to the monitor is that of the softmax over the tokenizer's rows (the K
    likeliest with top-k), as torch's Categorical computes it."""
    import torch

    from megatron_latent.models.interpolation import interpolate_embeddings

    g = torch.Generator().manual_seed(0)
    hidden, head, emb = (torch.randn(s, generator=g) for s in ((3, 4, 8), (40, 8), (40, 8)))
    got = []
    interpolate_embeddings(hidden, head, emb, vocab_size=37, topk=topk, record_entropy=got.append)
    logits = (hidden @ head.t())[..., :37]
    if topk:
        kth = logits.topk(topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-6)


def test_each_validation_reports_the_loss_at_other_j(tmp_path):
    """valid/loss_J<j> at the default J (0, 1, twice the evaluation J) is the validation loss a run
    evaluating at that J reports; an empty --jacobi-iters-eval-sweep turns it off."""
    base = TINY + LATENT + ["--train-iters", "2", "--eval-iters", "1", "--eval-interval", "2", "--log-interval", "2"]
    (a, b) = run_on_ranks(_runs, 1, [base + ["--tensorboard-dir", str(tmp_path / "a")],
                                     base + ["--tensorboard-dir", str(tmp_path / "b"), "--jacobi-iters-eval", "1",
                                             "--jacobi-iters-eval-sweep"]])[0]
    assert a[0] == 0 and b[0] == 0, a[2][-2000:] + b[2][-2000:]
    valid_a = [r for r in _records(tmp_path / "a" / "metrics.jsonl") if "valid/loss" in r]
    valid_b = [r for r in _records(tmp_path / "b" / "metrics.jsonl") if "valid/loss" in r]
    assert set(valid_a[0]) == {"iteration", "valid/loss", "valid/loss_J0", "valid/loss_J1", "valid/loss_J6"}
    assert set(valid_b[0]) == {"iteration", "valid/loss"}
    assert valid_a[0]["valid/loss_J1"] == pytest.approx(valid_b[0]["valid/loss"], rel=1e-6)
    assert " | loss J=0 " in a[1]


# ------------------------------------------------------------------------------ downstream accuracy
@pytest.mark.slow  # two exports and lm-eval runs in background processes: minutes on 2 busy cores
def test_downstream_accuracy_of_each_save_lands_in_the_metrics(tmp_path, monkeypatch):
    """--eval-tasks with a local task: every saved checkpoint is exported and run through lm-eval in
    the background; the accuracy lands at the checkpoint's iteration, and it is the accuracy of the
    exported model's own log-likelihoods."""
    import torch
    import transformers

    from data_fixtures import make_texts
    from test_lm_eval import TASK, _loglikelihood, _write_task
    from test_pretrain import _corpus

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, data = _corpus(tmp_path)
    texts = make_texts(8, seed=5, min_words=3, max_words=8)
    docs = [{"query": texts[i], "choices": ["the model thinks", "latent rank", "pipeline gradient loss"], "gold": i % 3}
            for i in range(6)]
    (tmp_path / "tasks").mkdir()
    _write_task(str(tmp_path / "tasks"), docs)
    save, tb = str(tmp_path / "ckpt"), str(tmp_path / "tb")
    argv = [a for a in TINY if a != "--mock-data"] + LATENT + [
        "--data-path", data, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        tok, "--seq-length", "32", "--train-iters", "4", "--save", save, "--save-interval", "2", "--eval-iters", "0",
        "--tensorboard-dir", tb, "--eval-tasks", str(tmp_path / "tasks"), "--eval-tasks-limit", "6",
        "--eval-tasks-batch-size", "4"]
    (code, out, err), = run_on_ranks(_runs, 1, [argv])[0]
    assert code == 0, err[-3000:]
    results = {r["iteration"]: r for r in _records(os.path.join(tb, "metrics.jsonl")) if "downstream/eval_time_s" in r}
    assert sorted(results) == [2, 4] and "downstream at iteration 4" in out, out[-3000:]
    hf_dir = os.path.join(save, "downstream", "hf")  # the last one exported: iteration 4
    assert json.load(open(os.path.join(hf_dir, "megatron_export.json")))["iteration"] == 4
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    with torch.no_grad():
        correct = sum(max(range(3), key=lambda i: _loglikelihood(model, hf_tok, d["query"], " " + d["choices"][i]))
                      == d["gold"] for d in docs)
    assert results[4][f"downstream/{TASK}/acc"] == pytest.approx(correct / len(docs))


def test_a_failing_downstream_evaluation_is_one_line(tmp_path, caplog):
    import logging

    from megatron_latent.training.downstream import DownstreamEvaluator

    ev = DownstreamEvaluator(str(tmp_path / "no-checkpoint"), "piqa", str(tmp_path / "tok.json"))
    with caplog.at_level(logging.INFO, logger="megatron_latent.training.downstream"):
        for iteration in (7, 8, 9):  # 8 and 9 are saved while 7 runs: 9 waits, 8 is skipped
            ev.submit(iteration)
        assert ev.poll(wait=True) == [(7, None), (9, None)]
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failed) == 2 and failed[0].endswith("; training goes on")
    assert failed[0].startswith("downstream evaluation of iteration 7 failed (exit status 1): "
                                "error: FileNotFoundError: --tokenizer-model ")
    assert any("iteration 8 skipped: iteration 7 is still being evaluated and 9 is newer" in r.getMessage()
               for r in caplog.records)


def test_eval_task_specs():
    from megatron_latent.training.downstream import PAPER_TASKS, flatten_results, resolve_tasks

    assert resolve_tasks("paper") == (list(PAPER_TASKS), None)
    assert resolve_tasks("piqa, sciq") == (["piqa", "sciq"], None)
    assert flatten_results({"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6},
                            "x": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": "N/A"}}) == {
        "piqa/acc": 0.5, "piqa/acc_stderr": 0.1, "piqa/acc_norm": 0.6, "x/exact_match_strict-match": 0.2}


def test_compare_table_shows_the_newest_accuracy_per_task(tmp_path):
    from megatron_latent.analysis.compare import format_table, summarize_run
    from test_compare_runs import CFG, _run_dir

    with_acc = _run_dir(tmp_path / "lat", CFG.replace(num_latent_thoughts=1), 1, 10, 4, 16, [4.0, 3.05], 50.0)
    with open(os.path.join(with_acc, "logs", "metrics.jsonl"), "a") as f:
        for step, piqa in ((5, 0.55), (10, 0.61)):
            f.write(json.dumps({"iteration": step, "downstream/piqa/acc": piqa, "downstream/piqa/acc_stderr": 0.01,
                                "downstream/sciq/acc": 0.3 + step / 100}) + "\n")
    runs = [summarize_run(with_acc, "latent"),
            summarize_run(_run_dir(tmp_path / "v", CFG, 1, 10, 4, 16, [4.0, 3.2], 10.0), "vanilla")]
    assert runs[0].downstream_acc == {"piqa": 0.61, "sciq": pytest.approx(0.4)} and runs[1].downstream_acc == {}
    head, _, latent, vanilla = format_table(runs).splitlines()
    assert head.endswith("| wall time (s) | piqa acc | sciq acc |")
    assert latent.endswith("| 50 | 0.61 | 0.4 |") and vanilla.endswith("| 10 | - | - |")


def test_wandb_takes_late_downstream_results_on_their_own_axis(tmp_path, monkeypatch):
    """Downstream results of iteration 2 that arrive after step 4 was logged reach W&B (which takes
    no earlier step) with downstream/iteration = 2; the training steps keep their own steps."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from megatron_latent.training.metrics import WandbRun

    run = WandbRun("p", str(tmp_path / "wandb"), str(tmp_path))
    for step in (2, 4):
        run.log(step, {"train/loss": 1.0 / step})
    run.log(2, {"downstream/piqa/acc": 0.6})
    run.log(6, {"train/loss": 0.1})
    run.close()
    import wandb

    wandb.teardown()  # the run file is written by W&B's service process: wait for it to finish
    history, _ = wandb_history(glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))[0])
    assert {s: r.get("train/loss") for s, r in history.items()} == {2: 0.5, 4: 0.25, 6: 0.1}
    assert history[4]["downstream/piqa/acc"] == 0.6 and history[4]["downstream/iteration"] == 2


def test_a_failing_wandb_stops_only_wandb(tmp_path, caplog):
    import logging

    from megatron_latent.training.metrics import MetricsWriter

    class Broken:
        def log(self, step, values):
            raise ConnectionError("service gone")

    writer = MetricsWriter(str(tmp_path), enabled=True, wandb=Broken())
    with caplog.at_level(logging.WARNING, logger="megatron_latent.training.metrics"):
        for step in (1, 2):
            writer.write(step, {"train/loss": 1.0})
    writer.close()
    assert [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()] == [
        "W&B stopped logging at iteration 1 (ConnectionError: service gone); metrics.jsonl and TensorBoard go on"]
    assert [r["iteration"] for r in _records(tmp_path / "metrics.jsonl")] == [1, 2]
