"""What a run shows while it trains: the Weights & Biases run (offline), Megatron's diagnostics
(weights norm, memory, profiler trace) and the thoughts' own signals."""

import glob
import json
import os

import pytest

from multirank import run_on_ranks

TINY = ["--model-preset", "tiny-llama", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-workers", "0", "--lr-warmup-fraction", "0", "--mock-data", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "2"]
LATENT = ["--num-latent-thoughts", "1", "--scale-embeddings"]


def _main(argv):
    import contextlib
    import io

    from megatron_latent import pretrain

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pretrain.main(argv)
    return code, out.getvalue(), err.getvalue()


def _runs(argvs):
    return [_main(a) for a in argvs]


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
