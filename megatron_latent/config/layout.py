"""The parallel layout and its one check.

Every rank evaluates the same pure checks on the same numbers before any collective, so a layout
that cannot work stops all ranks with the same one-line error instead of leaving some of them
waiting for a peer that already died. Field names are Megatron's flag names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_latent.config.errors import ConfigError, need


@dataclass(frozen=True)
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # The model's own interleaved layer chunks per pipeline rank (None or 1: the plain pipeline).
    num_virtual_stages_per_pipeline_rank: Optional[int] = None
    sequence_parallel: bool = False

    def __post_init__(self):
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        v = self.num_virtual_stages_per_pipeline_rank
        need(tp >= 1, f"tensor_model_parallel_size must be >= 1, got {tp}")
        need(pp >= 1, f"pipeline_model_parallel_size must be >= 1, got {pp}")
        if v is not None:
            need(v >= 1, f"num_virtual_stages_per_pipeline_rank must be >= 1, got {v}")
            need(v == 1 or pp > 1,
                  f"num_virtual_stages_per_pipeline_rank {v} needs pipeline_model_parallel_size > 1")
            if v == 1:  # one chunk per rank is the plain pipeline (megatron wants no virtual size then)
                object.__setattr__(self, "num_virtual_stages_per_pipeline_rank", None)
        need(not self.sequence_parallel or tp > 1, "sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def virtual_chunks(self) -> int:
        """Layer chunks per pipeline rank (1 for the plain pipeline)."""
        return self.num_virtual_stages_per_pipeline_rank or 1

    @classmethod
    def of(cls, config) -> "ParallelLayout":
        """The layout a megatron TransformerConfig was built for."""
        return cls(config.tensor_model_parallel_size, config.pipeline_model_parallel_size,
                   config.virtual_pipeline_model_parallel_size, bool(config.sequence_parallel))

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tensor_model_parallel_size * self.pipeline_model_parallel_size
        need(world_size % model_parallel == 0,
              f"world size {world_size} is not divisible by tensor_model_parallel_size "
              f"{self.tensor_model_parallel_size} x pipeline_model_parallel_size "
              f"{self.pipeline_model_parallel_size} = {model_parallel}")
        return world_size // model_parallel

    def check_model(self, cfg, seq_length: Optional[int] = None) -> None:
        """`cfg` (a ModelConfig) split this way: heads, groups, MLP and vocabulary
        over the TP ranks; layers over the stages (and their chunks); training sequences over the
        sequence-parallel ranks."""
        tp, pp, v = self.tensor_model_parallel_size, self.pipeline_model_parallel_size, self.virtual_chunks
        model = f"model {cfg.name!r}"
        for what, n in (("num_attention_heads", cfg.num_attention_heads), ("num_query_groups", cfg.query_groups),
                        ("ffn_hidden_size", cfg.ffn_hidden_size), ("padded vocabulary size", cfg.padded_vocab_size)):
            need(n % tp == 0 and tp <= n,
                  f"tensor_model_parallel_size {tp} does not divide the {what} {n} of {model}")
        need(pp <= cfg.num_layers,
              f"pipeline_model_parallel_size {pp} is larger than num_layers {cfg.num_layers} of {model}: "
              "every pipeline stage needs at least one layer")
        need(cfg.num_layers % (pp * v) == 0,
              f"num_layers {cfg.num_layers} of {model} is not divisible by pipeline_model_parallel_size {pp}"
              + (f" x num_virtual_stages_per_pipeline_rank {v}" if v > 1 else ""))
        if seq_length is not None:
            self.check_sequence_split(seq_length)

    def check_sequence_split(self, seq_length: int) -> None:
        """Training sequences of `seq_length` tokens split over the sequence-parallel ranks (whether
        they fit the model's positions is ModelConfig.check_sequence_fits)."""
        tp = self.tensor_model_parallel_size
        # Every pass's sequence (a whole number of slots per token) is split over the TP ranks.
        need(not self.sequence_parallel or seq_length % tp == 0,
              f"the training sequence length {seq_length} is not divisible by tensor_model_parallel_size {tp} "
              "(sequence_parallel splits every pass's sequence over the TP ranks)")

    def check_recompute(self, num_layers: int, recompute_granularity: Optional[str],
                        recompute_method: Optional[str], recompute_num_layers: int) -> None:
        """megatron's uniform full recompute checkpoints units of `recompute_num_layers` consecutive
        layers of a model chunk; a unit that runs past the chunk's last layer fails with an
        IndexError mid-step, so the unit must divide the chunk's `num_layers / chunks` layers."""
        if recompute_granularity != "full" or recompute_method != "uniform":
            return
        chunks = self.pipeline_model_parallel_size * self.virtual_chunks
        per_chunk = num_layers // chunks
        r = recompute_num_layers
        if r < 1 or per_chunk % r:
            where = f"a pipeline chunk ({num_layers} layers over {chunks} chunks)" if chunks > 1 else "the model"
            raise ConfigError(
                f"recompute_num_layers {r}: uniform recompute needs a divisor of {per_chunk}, the layers of "
                f"{where} ({per_chunk} reruns each pass of a chunk from its input, 1 each layer)")

    def check_schedule(self, num_microbatches: int, num_chunks: int, microbatch_group_size: Optional[int] = None):
        """The micro-batch count megatron's schedule accepts when a step runs as `num_chunks`
        virtual chunks per rank (the latent passes times the layer chunks)."""
        pp, m = self.pipeline_model_parallel_size, num_microbatches
        need(m >= 1, f"num_microbatches is {m}: the global batch must hold at least one micro-batch per "
                      "data-parallel rank")
        if pp == 1 or num_chunks == 1:
            return
        g = microbatch_group_size or pp
        if m < g or 0 < m % g < pp:
            raise ConfigError(
                f"num_microbatches {m} per step: a step runs as {num_chunks} virtual pipeline chunks, whose "
                f"interleaved schedule needs a multiple of pipeline_model_parallel_size {pp}"
                + (f" (microbatch_group_size_per_vp_stage {g})" if g != pp else "")
            )
