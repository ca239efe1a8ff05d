"""The latent-thought GPT (PonderLM-2) on megatron-core, and the baselines that share its pass loop.

Every token is followed by N latent thoughts: thought k of position i is the post-norm hidden
state of slot k-1 of the same position, fed back as an input vector (no projection). The input
vectors of one slot index across all positions form a *column*: column 0 holds the tokens, column
k thought k. Training solves all thoughts in parallel, pass after pass over the interleaved
columns (`LatentSettings.pass_slots` is the schedule):

1. growth, N passes: pass g runs the decoder over g columns; afterwards column j+1 is the hidden
   state at slot j for every j < g (one column more);
2. Jacobi, J passes over all N+1 columns, each refreshing columns 1..N from slots 0..N-1;
3. a final pass; logits and loss only at slot N of each position.

The loop lives in `solve_thoughts` and the hand-over between passes in `next_columns`: training,
the pipeline's pass chunks (parallel/passes.py) and the KV-cache prefill all go through them.
Gradients flow through every pass. N = 0 is exactly megatron's GPTModel. Tensor and sequence
parallelism come from megatron's layers: each pass scatters the interleaved sequence over the
tensor-parallel ranks and gathers the hidden states back to build the next pass.

The baselines (LatentSettings.method) are the same loop with other columns and hand-overs:

* interpolated thoughts: `thought_input` feeds the output-softmax mix of the embeddings
  (models/interpolation.py) instead of the hidden state;
* pause tokens: the first pass's columns are the tokens and K columns of the pause embedding;
  one pass, read at slot K;
* extra loops: K+1 passes over the tokens alone; the next pass's input is the previous pass's
  output before the final norm, which only the last pass applies;
* pondering (PonderLM): K+1 passes over the tokens alone, each a whole forward with the final
  norm; the next pass's input is the tokens (or, residual, the pass's own input) plus the
  embeddings mixed by the output softmax, or the pass's input plus its output (hidden feedback).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, List, Optional, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint

from megatron_latent.config import ConfigError, LatentSettings
from megatron_latent.models import slots
from megatron_latent.models.interpolation import interpolate_embeddings
from megatron_latent.models.loss import FusedLossGPTModel

# converged(columns before a Jacobi pass, columns after it) -> stop iterating
Converged = Callable[[List[torch.Tensor], List[torch.Tensor]], bool]


class LatentGPTModel(FusedLossGPTModel):
    """megatron-core GPTModel whose forward thinks N latent thoughts per token.

    Takes GPTModel's arguments plus `latent: LatentSettings`. Weights and their names are
    GPTModel's: an N=0 checkpoint is a vanilla one, and N only changes the forward.
    """

    # Set to a models.pass_stats.PassStats to record the pass loop's signals (training logs them).
    pass_stats = None

    def __init__(self, *args, latent: LatentSettings = LatentSettings(), pipeline_stage: bool = False,
                 token_vocab_size: Optional[int] = None, **kwargs):
        """`pipeline_stage=True`: this is one pipeline stage driven pass by pass by the pipeline
        wiring (megatron_latent.parallel.passes), which calls its pieces, never its forward.
        `token_vocab_size`: the tokenizer's rows of the (padded) vocabulary (ModelConfig.vocab_size;
        default all): interpolated thoughts mix only those, and the pause token is the row after."""
        super().__init__(*args, **kwargs)
        self.latent = latent
        self.token_vocab_size = token_vocab_size or self.vocab_size
        self.pause_token_id = self.token_vocab_size if latent.num_pause_tokens else None
        if self.pause_token_id is not None and self.pause_token_id >= self.vocab_size:
            raise ConfigError(f"the pause token (row {self.pause_token_id}) needs a padded vocabulary of more than "
                              f"{self.token_vocab_size} rows, got {self.vocab_size}")
        self.pipeline_stage = pipeline_stage
        if latent.method != "vanilla" and not (self.pre_process and self.post_process) and not pipeline_stage:
            raise ConfigError(
                "a LatentGPTModel split over pipeline stages (pipeline_model_parallel_size > 1) is built by "
                "megatron_latent.parallel.pipeline.build_latent_pipeline, not directly"
            )

    # ----------------------------------------------------------------------- inputs of a pass
    def token_inputs(self, input_ids, position_ids):
        """Column 0 (token input vectors [L, b, h]) and the position term added to every slot of a
        position (learned positions, [L, b, h]; None with rotary)."""
        if input_ids.shape[1] > self.max_sequence_length:
            raise ValueError(
                f"input of {input_ids.shape[1]} tokens is longer than the model's "
                f"{self.max_sequence_length} positions (seq_length)"
            )
        emb = self.embedding
        word = self.embed_words(input_ids) * self.embedding_scale  # [b, L, h], full sequence on every TP rank
        pos = emb.position_embeddings(position_ids) if emb.add_position_embedding else None
        tokens = word + pos if pos is not None else word
        tokens = tokens.transpose(0, 1).contiguous()
        return tokens, (pos.transpose(0, 1).contiguous() if pos is not None else None)

    def embed_words(self, ids):
        """Word embeddings [b, L, h] of the whole sequence on every tensor-parallel rank.

        The interleaved sequence is scattered over the sequence-parallel ranks after the thoughts
        are placed, so this lookup must not reduce-scatter as megatron's rotary models do; the stock
        forward (vanilla, unscaled) keeps megatron's reduce-scatter, which it expects."""
        words = self.embedding.word_embeddings
        reduce_scatter = words.reduce_scatter_embeddings
        words.reduce_scatter_embeddings = False
        try:
            return words(ids)
        finally:
            words.reduce_scatter_embeddings = reduce_scatter

    @property
    def embedding_scale(self) -> float:
        """What token embeddings (and the rows mixed into interpolated thoughts) are multiplied by."""
        lat = self.latent
        return math.sqrt(lat.embedding_scale_factor * self.config.hidden_size) if lat.scale_embeddings else 1.0

    def first_columns(self, tokens, pos) -> List[torch.Tensor]:
        """The columns of a forward's first pass: the tokens, and with pause tokens K columns of the
        pause embedding (row `pause_token_id`, scaled as a token, plus the position term)."""
        k = self.latent.num_pause_tokens
        if not k:
            return [tokens]
        ids = torch.full(tokens.shape[1::-1], self.pause_token_id, dtype=torch.long, device=tokens.device)
        pause = self.embed_words(ids) * self.embedding_scale  # [b, L, h]
        pause = pause.transpose(0, 1)
        pause = pause + pos if pos is not None else pause
        return [tokens] + [pause] * k

    def thought_input(self, hidden, pos):
        """The input vector of the slot after one whose post-norm hidden state is `hidden`, at the
        same position: the hidden state itself, or (interpolated thoughts) the embeddings mixed by
        its output softmax; plus the learned position term."""
        lat = self.latent
        if lat.thought_input == "interpolated":
            hidden = interpolate_embeddings(
                hidden, self.interpolation_head(), self.embedding.word_embeddings.weight, self.token_vocab_size,
                self.embedding_scale, lat.interpolation_topk,
                record_entropy=self.pass_stats.mixing_entropy if self.pass_stats is not None else None)
        return hidden if pos is None else hidden + pos

    def ponder_input(self, tokens, current, hidden):
        """The input of the pondering pass after one over the input `current` with post-norm
        output `hidden` ([L, b, h] each; `current` may be None when the feedback does not read it)."""
        lat = self.latent
        if lat.ponder_feedback == "hidden":  # modeling_gpt_neox_addhidden.py: current += h
            return current + hidden
        # modeling_llama_orin.py: e0 (or the current input) + softmax(lm_head(h)) @ (E * scale)
        mixed = interpolate_embeddings(hidden, self.interpolation_head(), self.embedding.word_embeddings.weight,
                                       self.token_vocab_size, self.embedding_scale)
        return (current if lat.ponder_residual else tokens) + mixed

    def interpolation_head(self) -> torch.Tensor:
        """The output layer's weight (this rank's vocabulary rows) as the first stage sees it."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        head = getattr(self, "thought_head", None)
        if head is not None:  # a first pipeline stage's synchronized copy (parallel/pipeline.py)
            return head
        if self.output_layer is None or self.output_layer.weight is None:
            raise RuntimeError("mixing embeddings (interpolated thoughts, pondering) needs the output layer "
                               "on the stage that embeds")
        return self.output_layer.weight

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's, with a first pipeline stage's `thought_head` (the synchronized copy of the
        output layer, parallel/pipeline.py) as a replica of `output_layer.weight`: saved once, by
        the last stage, and loaded from it, as megatron treats the last stage's tied embedding."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        head = getattr(self, "thought_head", None)
        if head is not None:
            metadata = ensure_metadata_has_dp_cp_group(metadata)
            sd[f"{prefix}thought_head"] = make_tp_sharded_tensor_for_checkpoint(
                tensor=head, key=f"{prefix}output_layer.weight",
                replica_id=(1, 0, ps.get_data_parallel_rank(with_context_parallel=True)),
                allow_shape_mismatch=True, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        return sd

    def next_columns(self, tokens, pos, hidden, num_slots: int, previous=None) -> List[torch.Tensor]:
        """The columns [tokens, thought 1, ...] of the pass after one over `num_slots` slots per
        position, whose full output is `hidden` [num_slots * L, b, h] (post-norm; with extra loops
        the output before the final norm, which is the next pass's whole input): column k+1 is fed
        from slot k, for k < min(num_slots, N). A growth pass thus adds a column. `previous`: the
        columns that pass ran over (pondering feeds on its input)."""
        if self.latent.num_extra_loops:
            return [hidden]
        if self.latent.num_ponder_steps:
            return [self.ponder_input(tokens, previous[0] if previous is not None else None, hidden)]
        n = self.latent.num_latent_thoughts
        fed = slots.split_slots(hidden, num_slots)[: min(num_slots, n)]
        return [tokens] + [self.thought_input(h, pos) for h in fed]

    def final_norm_on_pass(self, pass_index: int, num_passes: int) -> bool:
        """Whether pass `pass_index` ends with the final norm: every pass feeds thoughts from
        post-norm states, but a loop hands its residual stream on and normalizes once, at the end."""
        return not self.latent.num_extra_loops or pass_index == num_passes - 1

    # ----------------------------------------------------------------------------- one pass
    def rotary_for(self, position_ids: torch.Tensor, num_slots: int):
        """Rotary frequencies of every slot, indexed by its position id ([S, b, 1, d]), or None.

        Per sample (document resets give samples their own position ids); sized by the model's
        positions, so nothing here waits for the device."""
        if self.position_embedding_type != "rope":
            return None
        freqs = self.rotary_pos_emb(self.max_sequence_length)  # [P, 1, 1, d], cached by megatron
        pos = slots.slot_position_ids(position_ids, num_slots)  # [b, S]
        return freqs[:, 0, 0][pos.t()].unsqueeze(2)

    def decode(self, inputs, num_slots: int, attention_mask, position_ids, final_norm: bool = True):
        """This stage's layers over one pass's interleaved sequence. `inputs`: the full input
        vectors [S, b, h] on the first stage, None on later stages (megatron's set_input_tensor
        holds theirs). Returns the decoder's output (split over the sequence-parallel ranks), with
        the final norm on the last stage unless `final_norm` is False."""
        with contextlib.nullcontext() if final_norm else without_final_norm(self.decoder):
            return self.decoder(
                hidden_states=None if inputs is None else self.pass_input(inputs),
                attention_mask=slots.slot_attention_mask(attention_mask, num_slots),
                rotary_pos_emb=self.rotary_for(position_ids, num_slots),
            )

    def run_pass(self, columns, attention_mask, position_ids, final_norm: bool = True):
        """One pass of the whole decoder over the interleaved `columns` -> [S, b, h] (post-norm
        unless `final_norm` is False)."""
        h = self.decode(slots.interleave(columns), len(columns), attention_mask, position_ids, final_norm)
        return self.full_sequence(h)

    def pass_input(self, inputs):
        """The decoder input of a pass from its full interleaved input vectors: scattered over the
        sequence-parallel ranks, embedding dropout applied."""
        if not self.config.sequence_parallel:
            return self.embedding.embedding_dropout(inputs)
        x = tensor_parallel.scatter_to_sequence_parallel_region(inputs)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.embedding.embedding_dropout(x)

    def full_sequence(self, h):
        """Decoder output -> the whole sequence on every tensor-parallel rank."""
        if not self.config.sequence_parallel:
            return h
        # Every rank needs the whole sequence to place the thoughts. What follows is replicated
        # over the TP ranks up to the next scatter, whose backward all-gathers: the gradient
        # arriving here is already complete on every rank, so the gather's backward splits it.
        return tensor_parallel.gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False)

    # ------------------------------------------------------------------------------ the pass loop
    def solve_thoughts(
        self, tokens, pos, position_ids, attention_mask, num_jacobi: int, converged: Optional[Converged] = None,
    ) -> Tuple[List[torch.Tensor], int]:
        """Growth passes, then up to `num_jacobi` Jacobi passes: the columns of the final pass, and
        the Jacobi passes run. `converged(before, after)`, asked after each Jacobi pass, stops early."""
        n = self.latent.num_latent_thoughts
        # Training with grad_passes k: the passes before the last k keep no graph (their thoughts
        # enter the next pass as constants; the token column still carries gradients).
        no_grad = self.latent.passes_without_grad(num_jacobi) if torch.is_grad_enabled() else 0
        columns = self.first_columns(tokens, pos)
        schedule = self.latent.pass_slots(num_jacobi)
        if self.pass_stats is not None:
            self.pass_stats.columns(self.latent, 0, columns, final=len(schedule) == 1)
        for p, num_slots in enumerate(schedule[:-1]):
            with torch.no_grad() if p < no_grad else contextlib.nullcontext():
                hidden = self.run_pass(columns, attention_mask, position_ids,
                                       self.final_norm_on_pass(p, len(schedule)))
            new = self.next_columns(tokens, pos, hidden, num_slots, columns)
            if self.pass_stats is not None:
                self.pass_stats.columns(self.latent, p + 1, new, final=p + 2 == len(schedule))
            stop = p >= n and converged is not None and converged(columns, new)
            columns = new
            if stop:
                return columns, p + 1 - n
        return columns, num_jacobi

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
        if self.latent.method == "vanilla" and not self.latent.scale_embeddings:
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
        hidden = self.final_hidden_states(input_ids, position_ids, attention_mask, num_jacobi_iters)
        return self.output(hidden, input_ids, position_ids, labels=labels, loss_mask=loss_mask)

    def final_hidden_states(self, input_ids, position_ids, attention_mask, num_jacobi_iters=None):
        """Post-norm hidden states [L, b, h] at the output slot (N, or K with pause tokens) of every
        position after all passes."""
        lat = self.latent
        tokens, pos = self.token_inputs(input_ids, position_ids)
        columns, _ = self.solve_thoughts(
            tokens, pos, position_ids, attention_mask, self.resolve_jacobi_iters(num_jacobi_iters))
        return slots.take_slot(self.run_pass(columns, attention_mask, position_ids), lat.output_slot, lat.num_slots)

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
                "with latent.jacobi_iters_for_step(step, seed)"
            )
        return self.latent.jacobi_iters_eval


@contextlib.contextmanager
def without_final_norm(decoder):
    """megatron's TransformerBlock applies its final norm whenever it has one; a loop pass before
    the last must hand on the residual stream itself."""
    norm = decoder.final_layernorm
    decoder.final_layernorm = None
    try:
        yield
    finally:
        decoder.final_layernorm = norm
