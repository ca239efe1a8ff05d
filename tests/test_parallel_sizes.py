"""A bad parallel layout stops every rank at start-up with one line naming the flag."""

import pytest

from megatron_latent.parallel.initialize import ParallelConfigError, validate_parallel_sizes
from multirank import run_on_ranks


def test_valid_layout_returns_data_parallel_size():
    assert validate_parallel_sizes(8, 2, 2, num_layers=4, num_attention_heads=4) == 2
    assert validate_parallel_sizes(1) == 1


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(world_size=4, tensor_model_parallel_size=3), "--tensor-model-parallel-size 3"),
        (dict(world_size=4, pipeline_model_parallel_size=4, num_layers=2), "larger than --num-layers 2"),
        (dict(world_size=3, pipeline_model_parallel_size=3, num_layers=4), "--num-layers 4 is not divisible"),
        (dict(world_size=2, tensor_model_parallel_size=2, num_attention_heads=3), "--num-attention-heads 3"),
        (dict(world_size=4, tensor_model_parallel_size=4, num_query_groups=2), "--num-query-groups 2"),
        (dict(world_size=2, tensor_model_parallel_size=0), "--tensor-model-parallel-size must be >= 1"),
    ],
)
def test_bad_layout_names_the_flag(kwargs, flag):
    with pytest.raises(ParallelConfigError, match=flag):
        validate_parallel_sizes(**kwargs)
    message = str(pytest.raises(ParallelConfigError, validate_parallel_sizes, **kwargs).value)
    assert "\n" not in message


def _start(tp, pp, num_layers):
    from megatron_latent.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, pp, num_layers=num_layers)


def test_bad_layout_fails_on_every_rank_without_hanging():
    # A rank left waiting for the failed one would hit run_on_ranks' timeout, which reports
    # "timed out" instead of the flag: the match below fails then.
    with pytest.raises(AssertionError, match="larger than --num-layers 1"):
        run_on_ranks(_start, 2, 1, 2, 1, timeout=60)
