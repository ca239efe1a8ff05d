"""The latent-thought GPT (PonderLM-2) on megatron-core.

Every token is followed by N latent thoughts: thought k of position i is the post-norm hidden
state of slot k-1 of the same position, fed back as an input vector (no projection). Training
solves all thoughts in parallel (see DESIGN.md section 1):

1. growth, N passes: pass g runs the decoder over g interleaved stages; afterwards stage j+1 is
   the hidden at slot j for every j < g;
2. Jacobi, J passes over the full (N+1)L sequence, each refreshing stages 1..N from slots 0..N-1;
3. a final pass; logits and loss only at slot N of each position.

Gradients flow through every pass. N = 0 is exactly megatron's GPTModel. Tensor and sequence
parallelism come from megatron's layers: each pass scatters the interleaved sequence over the
tensor-parallel ranks and gathers the hidden states back to build the next pass.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel

from megatron_latent.models import slots


class LatentConfigError(ValueError):
    """Inconsistent latent-thought settings; the message names the flag."""


@dataclass(frozen=True)
class LatentSettings:
    num_latent_thoughts: int = 0
    # Inclusive range J is drawn from in training; None = (2, 3) when N > 0 (the paper's setting).
    jacobi_iters: Optional[Tuple[int, int]] = None
    jacobi_iters_eval: int = 3
    scale_embeddings: bool = False
    # Seed of the per-step Jacobi draw: every rank derives J from (seed, step) alone, so all ranks
    # run the same graph and a resumed run draws what the uninterrupted run would have.
    jacobi_seed: int = 0

    def __post_init__(self):
        n = self.num_latent_thoughts
        if n < 0:
            raise LatentConfigError(f"--num-latent-thoughts must be >= 0, got {n}")
        if n == 0:
            if self.jacobi_iters is not None:
                raise LatentConfigError(
                    "--jacobi-iters was given with --num-latent-thoughts 0: a vanilla model has no "
                    "thoughts to refine"
                )
        else:
            lo, hi = self.training_range
            if lo < 0 or hi < lo:
                raise LatentConfigError(
                    f"--jacobi-iters {lo} {hi}: need an inclusive range 0 <= min <= max"
                )
            if self.jacobi_iters_eval < 0:
                raise LatentConfigError(
                    f"--jacobi-iters-eval must be >= 0, got {self.jacobi_iters_eval}"
                )

    @property
    def training_range(self) -> Tuple[int, int]:
        if self.num_latent_thoughts == 0:
            return (0, 0)
        return tuple(self.jacobi_iters) if self.jacobi_iters is not None else (2, 3)

    @property
    def num_slots(self) -> int:
        return self.num_latent_thoughts + 1

    def jacobi_iters_for_step(self, step: int) -> int:
        lo, hi = self.training_range
        return random.Random(self.jacobi_seed * 1_000_003 + step).randint(lo, hi)

    def pass_lengths(self, num_jacobi: int) -> List[int]:
        """Slots per position of each decoder pass: growth 1..N, then J + 1 full passes."""
        n = self.num_latent_thoughts
        return list(range(1, n + 1)) + [n + 1] * (num_jacobi + 1) if n else [1]


def paper_init_methods(hidden_size: int, num_layers: int, num_latent_thoughts: int) -> dict:
    """TransformerConfig init fields of the paper (the authors' code, after Pythia's "small init").

    Every linear and the embedding ~ normal(0, std) truncated at 3 std with std = sqrt(2 / (5H));
    the output projections (attention out, MLP out) further divided by sqrt(2 * layers * (N+1)):
    the residual stream is traversed (N+1) times as deep in the latent model. Norms stay 1, biases 0
    (megatron's defaults). N = 0 gives the vanilla baselines of the paper.
    """
    std = math.sqrt(2.0 / (5.0 * hidden_size))
    out_std = std / math.sqrt(2.0 * num_layers * (num_latent_thoughts + 1))

    def truncated(s):
        def init_(tensor):
            return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=s, a=-3 * s, b=3 * s)

        return init_

    return {
        "init_method": truncated(std),
        "output_layer_init_method": truncated(out_std),
        "embedding_init_method": truncated(std),
        "init_method_std": std,
        "embedding_init_method_std": std,
    }


class LatentGPTModel(GPTModel):
    """megatron-core GPTModel whose forward thinks N latent thoughts per token.

    Takes GPTModel's arguments plus `latent: LatentSettings`. Weights and their names are
    GPTModel's: an N=0 checkpoint is a vanilla one, and N only changes the forward.
    """

    def __init__(self, *args, latent: LatentSettings = LatentSettings(), pipeline_stage: bool = False, **kwargs):
        """`pipeline_stage=True`: this is one pipeline stage driven pass by pass by the pipeline
        wiring (megatron_latent.parallel.pipeline), which calls its pieces, never its forward."""
        super().__init__(*args, **kwargs)
        self.latent = latent
        self.pipeline_stage = pipeline_stage
        if latent.num_latent_thoughts and not (self.pre_process and self.post_process) and not pipeline_stage:
            raise LatentConfigError(
                "LatentGPTModel with --pipeline-model-parallel-size > 1 is built by the pipeline "
                "wiring (megatron_latent.parallel.pipeline.build_latent_pipeline), not directly"
            )
        if self.pre_process:
            # The interleaved sequence is scattered over the sequence-parallel ranks here, after the
            # thoughts are placed, so the embedding must return the full sequence.
            self.embedding.word_embeddings.reduce_scatter_embeddings = False

    # ----------------------------------------------------------------- pieces shared by the passes
    def token_inputs(self, input_ids, position_ids):
        """Token-slot inputs [L, b, h] and the position term added to every slot (or None)."""
        if input_ids.shape[1] > self.max_sequence_length:
            raise ValueError(
                f"input of {input_ids.shape[1]} tokens is longer than the model's "
                f"{self.max_sequence_length} positions (--max-position-embeddings)"
            )
        emb = self.embedding
        word = emb.word_embeddings(input_ids)  # [b, L, h], full sequence on every TP rank
        if self.latent.scale_embeddings:
            word = word * math.sqrt(2.5 * self.config.hidden_size)
        pos = emb.position_embeddings(position_ids) if emb.add_position_embedding else None
        tokens = word + pos if pos is not None else word
        tokens = tokens.transpose(0, 1).contiguous()
        return tokens, (pos.transpose(0, 1).contiguous() if pos is not None else None)

    def rotary_for(self, position_ids: torch.Tensor, num_slots: int):
        """Rotary frequencies indexed by each slot's position id ([S, 1|b, 1, d]), or None."""
        if self.position_embedding_type != "rope":
            return None
        freqs = self.rotary_pos_emb(int(position_ids.max()) + 1)  # [P, 1, 1, d]
        pos = slots.slot_position_ids(position_ids, num_slots)  # [b, S]
        if bool((pos == pos[:1]).all()):
            return freqs[pos[0]]  # shared by the batch
        return freqs[:, 0, 0][pos.t()].unsqueeze(2)  # per-sample positions (document resets)

    def decoder_pass(self, inputs, attention_mask, rotary_pos_emb):
        """One pass of the decoder over a full interleaved sequence [S, b, h] -> post-norm [S, b, h]."""
        h = self.decoder(
            hidden_states=self.pass_input(inputs), attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb
        )
        return self.full_sequence(h)

    def pass_input(self, inputs):
        """The decoder input of a pass from its full interleaved input vectors: scattered over the
        sequence-parallel ranks, embedding dropout applied."""
        if not self.config.sequence_parallel:
            return self.embedding.embedding_dropout(inputs)
        return self._sp_dropout(tensor_parallel.scatter_to_sequence_parallel_region(inputs))

    def full_sequence(self, h):
        """Decoder output -> the whole sequence on every tensor-parallel rank."""
        if not self.config.sequence_parallel:
            return h
        # Every rank needs the whole sequence to place the thoughts. What follows is replicated
        # over the TP ranks up to the next scatter, whose backward all-gathers: the gradient
        # arriving here is already complete on every rank, so the gather's backward splits it.
        return tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)

    def next_pass_inputs(self, tokens, pos, hidden, num_slots: int):
        """Interleaved input vectors of the pass after one over `num_slots` slots per position.

        Stage k+1 := post-norm hidden at slot k (all positions at once), for k < min(num_slots, N);
        a growth pass thus appends a stage. `tokens`, `pos` from `token_inputs`; `hidden` is the
        full post-norm output [num_slots * L, b, h] of the previous pass.
        """
        return slots.interleave(self.next_stages(tokens, pos, hidden, num_slots))

    def next_stages(self, tokens, pos, hidden, num_slots: int):
        """[tokens, thought 1, ...] (each [L, b, h]) for the pass after one over `num_slots` slots."""
        n = self.latent.num_latent_thoughts
        thoughts = slots.split_slots(hidden, num_slots)[: min(num_slots, n)]
        return [tokens] + [t + pos if pos is not None else t for t in thoughts]

    def _sp_dropout(self, x):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.embedding.embedding_dropout(x)

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask,
        decoder_input=None,
        labels=None,
        num_jacobi_iters: Optional[int] = None,
        loss_mask=None,
        **kwargs,
    ):
        if self.latent.num_latent_thoughts == 0 and not self.latent.scale_embeddings:
            return super().forward(
                input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                loss_mask=loss_mask, **kwargs,
            )
        if self.pipeline_stage and not (self.pre_process and self.post_process):
            raise RuntimeError(
                "a latent pipeline stage runs through megatron_latent.parallel.pipeline "
                "(latent_forward_backward), not by calling the stage"
            )
        if decoder_input is not None or kwargs.get("inference_context") is not None:
            raise NotImplementedError("latent forward takes token ids (use the inference module to decode)")
        hidden = self.latent_hidden_states(input_ids, position_ids, attention_mask, num_jacobi_iters)
        return self.output(hidden, input_ids, position_ids, labels=labels, loss_mask=loss_mask)

    def output(
        self, hidden, input_ids, position_ids, labels=None, loss_mask=None, runtime_gather_output=None,
        scattered: bool = False,
    ):
        """Loss [b, L] (with labels) or logits [b, L, V] from full-sequence hidden states [L, b, h]
        (`scattered`: already split over the sequence-parallel ranks)."""
        if self.config.sequence_parallel and not scattered:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return self._postprocess(
            hidden_states=hidden,
            input_ids=input_ids,
            position_ids=position_ids,
            labels=labels,
            rotary_pos_emb=None,
            rotary_pos_cos=None,
            rotary_pos_sin=None,
            loss_mask=loss_mask,
            runtime_gather_output=runtime_gather_output,
        )

    def resolve_jacobi_iters(self, num_jacobi_iters: Optional[int]) -> int:
        if self.latent.num_latent_thoughts == 0:
            return 0
        if num_jacobi_iters is not None:
            return num_jacobi_iters
        if self.training:
            raise ValueError(
                "training forward needs num_jacobi_iters: draw it once per step for all ranks "
                "with latent.jacobi_iters_for_step(step)"
            )
        return self.latent.jacobi_iters_eval

    def latent_hidden_states(self, input_ids, position_ids, attention_mask, num_jacobi_iters=None):
        """Post-norm hidden states at slot N of every position after growth, Jacobi and final passes."""
        n = self.latent.num_latent_thoughts
        num_jacobi = self.resolve_jacobi_iters(num_jacobi_iters)
        tokens, pos = self.token_inputs(input_ids, position_ids)
        lengths = self.latent.pass_lengths(num_jacobi)
        h = None
        for i, num_slots in enumerate(lengths):
            inputs = tokens if i == 0 else self.next_pass_inputs(tokens, pos, h, lengths[i - 1])
            h = self.decoder_pass(
                inputs,
                slots.slot_attention_mask(attention_mask, num_slots),
                self.rotary_for(position_ids, num_slots),
            )
        return slots.take_slot(h, n, n + 1)

    def latent_pass(self, stages, pos, position_ids, attention_mask):
        """One decoder pass over the interleaved `stages` ([tokens, thought 1, ...], each [L, b, h]).

        Returns the pass's post-norm hidden states [len(stages) * L, b, h] and the next stages:
        stage k+1 := hidden at slot k (all positions at once), so a growth pass (fewer than N+1
        stages) appends one stage and a Jacobi pass refreshes them all. `pos` is the position term
        of token_inputs (added to every thought input) or None. Inference reuses this to solve a
        prompt's thoughts before filling the KV cache.
        """
        num_slots = len(stages)
        h = self.decoder_pass(
            slots.interleave(stages),
            slots.slot_attention_mask(attention_mask, num_slots),
            self.rotary_for(position_ids, num_slots),
        )
        return h, self.next_stages(stages[0], pos, h, num_slots)
