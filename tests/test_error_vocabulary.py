"""One error vocabulary: the library's errors name the arguments and fields a Python caller passes,
and only the command lines show them as flags (cli.flag_message with training.arguments.LIBRARY_FLAGS).

Run as a script, this prints the library's messages (raise statements, logger and warnings calls
outside the command-line modules) that name flags, and their count."""

import argparse
import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megatron_latent"
# The command-line layer: parsers, entry points and the flag table.
CLI_MODULES = {"cli.py", "pretrain.py", "generate.py", "training/arguments.py", "training/megatron_flags.py"}
# Flags of other programs that library messages quote: the authors' trainer and torchrun.
FOREIGN_FLAGS = {"--patch_method", "--nproc_per_node"}
FLAG = re.compile(r"--[a-z][\w-]*")
LOG_CALLS = {"debug", "info", "warning", "warn", "error", "exception", "critical"}


def flag_messages():
    """(module:line, flag) of every raise statement and logger/warnings call outside the
    command-line layer whose text names a flag."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in CLI_MODULES or rel.startswith("tools/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            message = isinstance(node, ast.Raise) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_CALLS)
            if not message:
                continue
            for part in ast.walk(node):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found += [(f"{rel}:{node.lineno}", f) for f in FLAG.findall(part.value) if f not in FOREIGN_FLAGS]
    return found


def test_library_messages_name_no_flags():
    assert flag_messages() == []


def _library_and_cli(raises, call, parser=None):
    from megatron_latent.training.arguments import flag_error

    with pytest.raises(raises) as e:
        call()
    assert "--" not in str(e.value), str(e.value)
    return str(e.value), flag_error(e.value, parser)


def test_library_errors_name_fields_and_the_command_line_shows_flags(tmp_path):
    from megatron_latent.checkpoint_layout import resolve_iteration
    from megatron_latent.data.corpus import InputError, expand_inputs
    from megatron_latent.data.gpt_data import DataArgs, DataConfigError, make_gpt_dataset_config
    from megatron_latent.data.tokenizer import TokenizerError, build_tokenizer
    from megatron_latent.tools.preprocess_data import build_parser as preprocess_parser
    from megatron_latent.training import resume

    empty, missing = str(tmp_path), str(tmp_path / "missing")
    lib, cli = _library_and_cli(resume.ResumeError, lambda: resume.resume(empty, None, [], None, None, finetune=True))
    assert lib == f"finetune=True: no checkpoint in load_dir {empty}"
    assert cli == f"--finetune: no checkpoint in --load {empty}"
    lib, cli = _library_and_cli(resume.ResumeError, lambda: resume._check_optimizer_layout(
        empty, {"use_distributed_optimizer": True, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1},
        {"use_distributed_optimizer": False, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
         "bf16": True}))
    assert lib.startswith(f"load_dir {empty}: its optimizer state was saved with use_distributed_optimizer=True "
                          "tensor_model_parallel_size 2 pipeline_model_parallel_size 1 and cannot be read with "
                          "tensor_model_parallel_size 1 pipeline_model_parallel_size 1 bf16=True")
    assert cli.startswith(f"--load {empty}: its optimizer state was saved with --use-distributed-optimizer "
                          "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 and cannot be read with "
                          "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --bf16")
    assert lib.endswith("pass load_optim=False to start the Adam moments fresh")
    assert cli.endswith("pass --no-load-optim to start the Adam moments fresh")
    lib, cli = _library_and_cli(FileNotFoundError, lambda: resolve_iteration(missing))
    assert (lib, cli) == (f"load_dir {missing}: no such directory", f"--load {missing}: no such directory")

    lib, cli = _library_and_cli(TokenizerError, lambda: build_tokenizer("HuggingFaceTokenizer"))
    assert (lib, cli) == ("tokenizer_type HuggingFaceTokenizer needs tokenizer_model",
                          "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model")
    lib, cli = _library_and_cli(DataConfigError, lambda: make_gpt_dataset_config(DataArgs(8, ["x"], split=None), None))
    assert (lib, cli) == ("data_path needs DataArgs.split (e.g. 969,30,1)", "--data-path needs --split (e.g. 969,30,1)")
    lib, cli = _library_and_cli(DataConfigError, lambda: make_gpt_dataset_config(DataArgs(8), None))
    assert cli == "give --data-path, --train-data-path/--valid-data-path/--test-data-path, or --mock-data"
    # The preprocessing tool's parser: its own flags, and only the table entries it has.
    lib, cli = _library_and_cli(InputError, lambda: expand_inputs([missing]), preprocess_parser())
    assert cli == f"--input {missing}: no such file, directory or matching glob"


def test_only_names_the_parser_knows_become_flags():
    from megatron_latent.cli import flag_message
    from megatron_latent.training.arguments import LIBRARY_FLAGS, flag_error

    # Plain words stay (the test split, finetune, load); qualified and "_" names and switches change.
    assert flag_error(ValueError("change DataArgs.split (a 0 weight for the test split); finetune, load, "
                                 "finetune=True, load_optim=False, max_lr 0.1, my_load_dir")) == (
        "change --split (a 0 weight for the test split); finetune, load, --finetune, --no-load-optim, --lr 0.1, "
        "my_load_dir")
    # A table entry applies only where the parser has its flag.
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir")
    p.add_argument("--force", action="store_true")
    p.add_argument("--iteration", type=int)
    assert flag_message(ValueError("hf_dir x; load_dir y; pass force=True; iteration=5: no iteration 5"), p,
                        LIBRARY_FLAGS) == "--hf-dir x; load_dir y; pass --force; --iteration 5: no iteration 5"


if __name__ == "__main__":
    hits = flag_messages()
    print("\n".join(f"{where}: {flag}" for where, flag in hits))
    print(f"{len({where for where, _ in hits})} messages name flags", file=sys.stderr)
