"""A bad parallel layout stops every rank at start-up with one line: the library names fields, the
command line shows its flags."""

import argparse

import pytest

from megatron_latent.config import ConfigError, ParallelLayout, get_preset
from multirank import run_on_ranks

MODEL = get_preset("tiny-llama")  # 4 layers, 4 heads, 2 query groups


def test_valid_layout_returns_data_parallel_size():
    layout = ParallelLayout(2, 2)
    layout.check_model(MODEL)
    assert layout.data_parallel_size(8) == 2
    assert ParallelLayout().data_parallel_size(1) == 1


@pytest.mark.parametrize(
    "layout,world,model,field",
    [
        (dict(tensor_model_parallel_size=3), 4, None, "world size 4 is not divisible by tensor_model_parallel_size 3"),
        (dict(pipeline_model_parallel_size=8), 8, MODEL, "pipeline_model_parallel_size 8 is larger than num_layers 4"),
        (dict(pipeline_model_parallel_size=3), 3, MODEL, "num_layers 4 of model 'tiny-llama' is not divisible"),
        (dict(tensor_model_parallel_size=2), 2, MODEL.replace(num_attention_heads=2, num_query_groups=1),
         "the num_query_groups 1"),
        (dict(tensor_model_parallel_size=4), 4, MODEL, "does not divide the num_query_groups 2"),
        (dict(tensor_model_parallel_size=0), 2, None, "tensor_model_parallel_size must be >= 1"),
        (dict(sequence_parallel=True), 1, None, "sequence_parallel needs tensor_model_parallel_size > 1"),
    ],
)
def test_bad_layout_names_the_field(layout, world, model, field):
    def check():
        lay = ParallelLayout(**layout)
        lay.data_parallel_size(world)
        if model is not None:
            lay.check_model(model)

    with pytest.raises(ConfigError, match=field):
        check()
    assert "\n" not in str(pytest.raises(ConfigError, check).value)


def test_the_command_line_shows_flags():
    from megatron_latent.cli import flag_message
    from megatron_latent.training.arguments import flag_error

    with pytest.raises(ConfigError) as e:
        ParallelLayout(3, 1).check_model(MODEL)
    assert flag_error(e.value) == ("--tensor-model-parallel-size 3 does not divide the --num-attention-heads 4 of "
                                   "model 'tiny-llama'")
    with pytest.raises(ConfigError) as e:
        MODEL.check_sequence_fits(100)
    assert "(--max-position-embeddings)" in flag_error(e.value)
    with pytest.raises(ConfigError) as e:
        ParallelLayout(1, 2).check_schedule(3, 4)
    assert flag_error(e.value).startswith("the micro-batch count (--global-batch-size / (--micro-batch-size x "
                                          "data-parallel size)) 3 per step")
    # Only whole names that are the parser's destinations change.
    p = argparse.ArgumentParser()
    p.add_argument("--num-layers")
    assert flag_message(ValueError("num_layers 2; my_num_layers 3; num_layers_x"), p) == (
        "--num-layers 2; my_num_layers 3; num_layers_x")


def _start(tp, pp):
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, pp, model=get_preset("tiny-llama", num_layers=1))


def test_bad_layout_fails_on_every_rank_without_hanging():
    # A rank left waiting for the failed one would hit run_on_ranks' timeout, which reports
    # "timed out" instead of the field: the match below fails then.
    with pytest.raises(AssertionError, match="pipeline_model_parallel_size 2 is larger than num_layers 1"):
        run_on_ranks(_start, 2, 1, 2, timeout=60)
