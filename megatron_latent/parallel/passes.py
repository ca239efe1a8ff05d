"""One virtual pipeline chunk = one pass of the latent forward over one stage's layers.

The latent forward runs the decoder several times (growth, Jacobi, final pass; see
models/latent.py), and every pass needs the post-norm output of the previous one at the first
stage. megatron's interleaved schedule sends the output of chunk c on the last pipeline rank to
chunk c+1 on the first rank, so pass p is made virtual chunk p (times the model's own layer chunks,
if any) of a pipeline whose chunks all share one set of weights:

* the first stage builds pass 0's columns with the model's `first_columns` (the tokens, and the
  pause columns of a pause-token model) and pass p's from its own token embeddings and what it
  receives (the output of pass p-1, sent by the last stage), with the model's `next_columns`: the
  same hand-over as the single-stage pass loop (thoughts, interpolated thoughts, a loop's
  residual stream, or pondering's feedback);
* every stage runs its own layers on every pass;
* the last stage applies the final norm on the passes the model says (`final_norm_on_pass`: every
  pass but a loop's non-final ones) and the output layer and loss only on the final pass, at the
  output slot.

A `PassChunk` holds its stage module *unregistered*: it has no parameters of its own, so megatron DDP
sees every weight once (one gradient buffer, accumulated over all passes and micro-batches) and
checkpoints hold the plain stage weights.

Passes differ in length (a growth pass has fewer slots per position). Each chunk pads its output to
the longest pass before it goes on the wire and the receiver slices it back, so every message has
the schedule's fixed shape: no shape exchange (megatron's `variable_seq_lengths` path always batches
its shape messages, which pair wrongly on gloo when the previous and next stage are the same rank),
and no extra compute (only the transfer of a growth pass is longer than needed).

Pondering whose next input reads the pass's own input (the hidden feedback, or the residual
interpolated one) carries that input along: every message of such a pipeline is the pass's
output followed by its input (this rank's rows of each), which the stages between pass on
untouched, so the first stage gets both and gradients flow back through both.
"""

from __future__ import annotations

from typing import Deque, List, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.utils import unwrap_model

from megatron_latent.models import slots


def carries_input(latent) -> bool:
    """Whether a pass's hand-off carries its input too (pondering that adds to the current input)."""
    return bool(latent.num_ponder_steps) and (latent.ponder_feedback == "hidden" or latent.ponder_residual)


def hand_off_length(latent, num_jacobi: int, seq_length: int) -> int:
    """Rows (before any sequence-parallel split) of every message between pass chunks."""
    return (max(latent.pass_slots(num_jacobi)) + int(carries_input(latent))) * seq_length


class PassChunk(torch.nn.Module):
    """Virtual pipeline chunk `chunk_id`: pass `pass_index` over the layers of `stage`.

    `pass_slots[p]` is the number of slots per position of pass p (LatentSettings.pass_slots).
    `config` is the schedule's view of the model config (its virtual pipeline size is the number
    of chunks); the stage keeps its own.
    """

    def __init__(self, stage, pass_index: int, pass_slots: List[int], config, chunk_id: int,
                 thoughts_from: Optional[Deque[torch.Tensor]] = None):
        """`thoughts_from`: the first stage's source of the previous pass's output when that pass
        ran in another schedule (the passes without a graph, see pipeline.latent_forward_backward):
        one tensor per micro-batch, in order, instead of the pipeline's own hand-off."""
        super().__init__()
        module = unwrap_model(stage)
        # Not registered as a submodule: no parameter may be seen twice (DDP, optimizer, checkpoints).
        object.__setattr__(self, "stage", module)
        self.config = config
        self.model_type = module.model_type
        self.vp_stage = chunk_id
        self.pass_index = pass_index
        self.pass_slots = list(pass_slots)
        self.thoughts_from = thoughts_from
        self._input: Optional[torch.Tensor] = None

    @property
    def is_final_pass(self) -> bool:
        return self.pass_index == len(self.pass_slots) - 1

    def set_input_tensor(self, input_tensor):
        self._input = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def forward(
        self,
        input_ids,
        position_ids,
        attention_mask=None,
        labels=None,
        loss_mask=None,
        num_jacobi_iters: Optional[int] = None,
        **unused,
    ):
        """The LatentGPTModel.forward signature, so one forward_step serves every layout. Returns
        the (padded) hidden states for the next chunk, or on the final chunk the per-token loss
        [b, L] (with labels) or logits."""
        m = self.stage
        n = m.latent.num_latent_thoughts
        expected = len(self.pass_slots) - n - 1
        if num_jacobi_iters is not None and n and num_jacobi_iters != expected:
            raise ValueError(
                f"forward_step asked for {num_jacobi_iters} Jacobi iterations but this step's pipeline "
                f"was built for {expected}"
            )
        p, L = self.pass_index, input_ids.shape[1]
        num_slots = self.pass_slots[p]
        carry = carries_input(m.latent)
        inputs = carried = None  # later stages: the previous stage's output, through set_input_tensor
        if m.pre_process:
            tokens, pos = m.token_inputs(input_ids, position_ids)
            if p == 0:
                columns = m.first_columns(tokens, pos)
            else:
                prev = self.pass_slots[p - 1]
                received = self.thoughts_from.popleft() if self.thoughts_from is not None else self._input
                self._input = None
                previous = [m.full_sequence(self._carried(received, L))] if carry else None
                columns = m.next_columns(tokens, pos, m.full_sequence(self._rows(received, prev * L)), prev, previous)
            if m.pass_stats is not None:
                m.pass_stats.columns(m.latent, p, columns, self.is_final_pass)
            inputs = slots.interleave(columns)
            if carry:
                carried = (tensor_parallel.scatter_to_sequence_parallel_region(inputs)
                           if self.config.sequence_parallel else inputs)
        else:
            received, self._input = self._input, None
            m.decoder.set_input_tensor(self._rows(received, num_slots * L))
            carried = self._carried(received, L) if carry else None
        h = m.decode(inputs, num_slots, attention_mask, position_ids,
                     final_norm=m.final_norm_on_pass(p, len(self.pass_slots)))
        if m.post_process and self.is_final_pass:
            if num_slots == 1:
                # One slot per position (vanilla, extra loops): the (sequence-parallel) output is
                # already what the output layer takes.
                return m.output(h, input_ids, position_ids, labels=labels, loss_mask=loss_mask, scattered=True)
            last = slots.take_slot(m.full_sequence(h), m.latent.output_slot, num_slots)
            return m.output(last, input_ids, position_ids, labels=labels, loss_mask=loss_mask)
        h = self._padded(h, L)
        return h if carried is None else torch.cat([h, carried])

    # ------------------------------------------------------------------- fixed-shape hand-offs
    def _carried(self, x: Optional[torch.Tensor], seq_length: int) -> torch.Tensor:
        """The pass input carried after the (padded) output in a pondering hand-off."""
        if x is None:
            raise RuntimeError(f"pipeline chunk {self.vp_stage} got no input tensor from the previous stage")
        start = self._local(max(self.pass_slots) * seq_length)
        return x[start:start + self._local(seq_length)]

    def _local(self, length: int) -> int:
        """Rows of a `length`-long sequence held by this rank (split under sequence parallelism)."""
        if self.config.sequence_parallel:
            return length // self.config.tensor_model_parallel_size
        return length

    def _rows(self, x: Optional[torch.Tensor], length: int) -> torch.Tensor:
        """The first `length` positions of a padded hand-off."""
        if x is None:
            raise RuntimeError(f"pipeline chunk {self.vp_stage} got no input tensor from the previous stage")
        rows = self._local(length)
        return x if x.shape[0] == rows else x[:rows]

    def _padded(self, h: torch.Tensor, seq_length: int) -> torch.Tensor:
        rows = self._local(max(self.pass_slots) * seq_length)
        if h.shape[0] == rows:
            return h
        return torch.nn.functional.pad(h, (0, 0, 0, 0, 0, rows - h.shape[0]))
