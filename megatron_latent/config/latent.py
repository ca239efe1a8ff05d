"""How a model spends compute per token, orthogonal to the network: `LatentSettings` (latent
thoughts, the paper's baselines: pause tokens, extra loops, pondering) and its Jacobi schedule.
`ModelConfig` (config/model.py) holds one as its field `latent`; like it, this module knows nothing
of files or flags, and its errors (`ConfigError`) name its fields.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_latent.config.errors import need

PAPER_JACOBI_ITERS = (2, 3)  # the range the paper states; also a LatentSettings' own default outside a ModelConfig
METHODS = ("vanilla", "latent", "interpolated", "pause", "loop", "ponder")
# LatentSettings' size fields, one per way of spending compute: at most one is non-zero.
METHOD_SIZE_FIELDS = ("num_latent_thoughts", "num_pause_tokens", "num_extra_loops", "num_ponder_steps")
THOUGHT_INPUTS = ("hidden", "interpolated")
PONDER_FEEDBACKS = ("interpolated", "hidden")


@dataclass(frozen=True)
class LatentSettings:
    """How the model spends compute per token: the method, orthogonal to the network.

    * latent thoughts (PonderLM-2, `num_latent_thoughts` N > 0): N thought slots after every
      token, each fed the post-norm hidden state of the slot before it (`thought_input` "hidden"),
      or the embeddings mixed by the output softmax of that state ("interpolated": PonderLM-2
      with interpolated thoughts, PonderLM's feedback in slots; `interpolation_topk` k > 0 mixes
      only the k likeliest tokens), solved by Jacobi passes;
    * pause tokens (`num_pause_tokens` K > 0): K slots of one learned pause embedding after every
      token, one pass, the prediction read at the last of them;
    * looped depth (`num_extra_loops` K > 0): the layer stack applied K+1 times with shared
      weights, the final norm once;
    * pondering (PonderLM, `num_ponder_steps` K > 0): K+1 full forwards over the tokens; after
      each but the last, every position's next input is its token embedding plus the embeddings
      mixed by its output softmax (`ponder_feedback` "interpolated", the authors' LLaMA code;
      `ponder_residual`: added to the current input instead of the token embedding), or the
      current input plus its post-norm hidden state ("hidden", their GPT-NeoX code). None: the
      family's, filled in by ModelConfig.

    The four are exclusive; all zero is a vanilla GPT (and the weights never depend on the method,
    except for the pause token's embedding row). `jacobi_iters` is the inclusive range the training
    J is drawn from per step (None: the family's default, which ModelConfig fills in, so a model's
    settings always hold its range); it is None without latent thoughts. `jacobi_iters_eval` is
    the J of evaluation forwards (unused without latent thoughts). `scale_embeddings` (token
    embeddings times sqrt(c H), c in `embedding_scale_factor`): None means the authors' setting,
    on exactly when a method is on.
    `grad_passes` k: only the last k passes of a training forward with latent thoughts (the final
    pass counted) build an autograd graph; the passes before them run without one and keep no
    activations (None: every pass, the paper's full backpropagation).
    """

    num_latent_thoughts: int = 0
    jacobi_iters: Optional[Tuple[int, int]] = None
    jacobi_iters_eval: int = 3
    scale_embeddings: Optional[bool] = None
    grad_passes: Optional[int] = None
    thought_input: str = "hidden"
    interpolation_topk: int = 0
    num_pause_tokens: int = 0
    num_extra_loops: int = 0
    num_ponder_steps: int = 0
    ponder_feedback: Optional[str] = None
    ponder_residual: bool = False

    def __post_init__(self):
        n = self.num_latent_thoughts
        for name in METHOD_SIZE_FIELDS + ("interpolation_topk",):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        on = [name for name in METHOD_SIZE_FIELDS if getattr(self, name)]
        need(len(on) <= 1, f"{' and '.join(on)} are exclusive: latent thoughts, pause tokens and extra loops "
                           "are different methods; choose one")
        ponder = self.num_ponder_steps > 0
        need(self.ponder_feedback in (None,) + PONDER_FEEDBACKS,
             f"ponder_feedback {self.ponder_feedback!r}: one of {', '.join(PONDER_FEEDBACKS)}")
        need(ponder or (self.ponder_feedback is None and not self.ponder_residual),
             "ponder_feedback and ponder_residual apply to pondering (num_ponder_steps > 0) only")
        need(not self.ponder_residual or self.ponder_feedback != "hidden",
             "ponder_residual applies to the interpolated feedback (the hidden feedback always adds to the input)")
        need(self.thought_input in THOUGHT_INPUTS,
             f"thought_input {self.thought_input!r}: one of {', '.join(THOUGHT_INPUTS)}")
        need(self.thought_input == "hidden" or n > 0,
             f"thought_input {self.thought_input!r} needs latent thoughts (num_latent_thoughts > 0)")
        need(not self.interpolation_topk or self.thought_input == "interpolated",
             "interpolation_topk applies to thought_input 'interpolated' only")
        need(self.jacobi_iters_eval >= 0, f"jacobi_iters_eval must be >= 0, got {self.jacobi_iters_eval}")
        j = self.jacobi_iters
        if j is not None:
            j = tuple(int(x) for x in j)
            need(len(j) == 2 and 0 <= j[0] <= j[1], f"jacobi_iters {list(j)}: need an inclusive range 0 <= min <= max")
        object.__setattr__(self, "jacobi_iters", j if n else None)
        if self.scale_embeddings is None and not (ponder and self.ponder_feedback is None):
            # The authors' GPT-NeoX pondering (hidden feedback) never scales its embeddings.
            object.__setattr__(self, "scale_embeddings",
                               self.method != "vanilla" and not (ponder and self.ponder_feedback == "hidden"))
        need(self.grad_passes is None or self.grad_passes >= 1,
             f"grad_passes must be >= 1 (the final pass carries the loss), got {self.grad_passes}")
        need(self.grad_passes is None or n > 0,
             "grad_passes applies to latent thoughts (num_latent_thoughts > 0) only")

    @property
    def method(self) -> str:
        """One of METHODS."""
        if self.num_latent_thoughts:
            return "latent" if self.thought_input == "hidden" else "interpolated"
        if self.num_pause_tokens:
            return "pause"
        if self.num_extra_loops:
            return "loop"
        if self.num_ponder_steps:
            return "ponder"
        return "vanilla"

    @property
    def label(self) -> str:
        """The method and its size, as logs and tables show it: "latent N=1", "interpolated N=1",
        "pause K=3", "loop K=3", "ponder K=3" (PonderLM; "ponder K=3 residual", "ponder K=3
        hidden" for the other feedbacks), "vanilla"."""
        size = {"latent": ("N", self.num_latent_thoughts), "interpolated": ("N", self.num_latent_thoughts),
                "pause": ("K", self.num_pause_tokens), "loop": ("K", self.num_extra_loops),
                "ponder": ("K", self.num_ponder_steps)}.get(self.method)
        feedback = " hidden" if self.ponder_feedback == "hidden" else " residual" if self.ponder_residual else ""
        return self.method + (f" {size[0]}={size[1]}" if size else "") + feedback

    @property
    def mixes_embeddings(self) -> bool:
        """Whether the forward mixes the embeddings by the output softmax (interpolated thoughts,
        pondering with the interpolated feedback): the embedding stage needs the output layer."""
        if self.num_ponder_steps:
            return self.ponder_feedback != "hidden"
        return self.thought_input == "interpolated"

    @property
    def paper_weight_decay(self) -> float:
        """The weight decay of the authors' script for this method: 0.01 for PonderLM
        (train_ponderlm_llama_1_4b.sh), 0.1 for the others (their PonderLM-2, loop and pause scripts)."""
        return 0.01 if self.num_ponder_steps else 0.1

    @property
    def embedding_scale_factor(self) -> float:
        """c of the token embeddings' scale sqrt(c H) when `scale_embeddings` is on: 2.5 where the
        next input is a post-norm hidden state (unit RMS, so the tokens start at its size), 1 for
        pause tokens and interpolated thoughts, whose inputs are all embeddings (the authors' code
        of each method)."""
        return 2.5 if self.method in ("vanilla", "latent", "loop") else 1.0  # ponder: sqrt(H), orin

    @property
    def residual_depth(self) -> int:
        """How many times a token's prediction traverses the layer stack in sequence: N+1 with
        latent thoughts, K+1 with extra loops or pondering, else 1 (the init scales by it, see
        models/init.py)."""
        if self.num_latent_thoughts:
            return self.num_latent_thoughts + 1
        return self.num_extra_loops + self.num_ponder_steps + 1

    @property
    def output_slot(self) -> int:
        """The slot of each position whose hidden state predicts the next token."""
        return self.num_slots - 1

    @property
    def num_slots(self) -> int:
        """Slots per position: the token and its N thoughts (or its K pauses)."""
        return max(self.num_latent_thoughts, self.num_pause_tokens) + 1

    def jacobi_choices(self) -> List[int]:
        """Every J a run can use: the training range and the evaluation J ([0] without latent thoughts)."""
        if not self.num_latent_thoughts:
            return [0]
        lo, hi = self._jacobi_range()
        return sorted(set(range(lo, hi + 1)) | {self.jacobi_iters_eval})

    def jacobi_iters_for_step(self, step: int, seed: int) -> int:
        """The J of training step `step`, from (seed, step) alone: every rank draws the same, and a
        resumed run draws what the uninterrupted run would have."""
        lo, hi = self._jacobi_range() if self.num_latent_thoughts else (0, 0)
        return random.Random(seed * 1_000_003 + step).randint(lo, hi)

    def _jacobi_range(self) -> Tuple[int, int]:
        # A ModelConfig has filled in its family's range; settings outside one take the paper's.
        return self.jacobi_iters or PAPER_JACOBI_ITERS

    def passes_without_grad(self, num_jacobi: int) -> int:
        """How many of the first passes of a training forward run without an autograd graph."""
        total = len(self.pass_slots(num_jacobi))
        return 0 if self.grad_passes is None else max(0, total - self.grad_passes)

    def pass_slots(self, num_jacobi: int) -> List[int]:
        """Slots per position of every decoder pass of a forward with `num_jacobi` Jacobi passes:
        growth passes 1..N, then J Jacobi passes and the final pass over all N+1 slots. The pass
        schedule of training, of the pipeline's virtual chunks, of the prefill and of the FLOP count."""
        n = self.num_latent_thoughts
        if n:
            return list(range(1, n + 1)) + [n + 1] * (num_jacobi + 1)
        # Pause tokens: one pass over all slots; extra loops and pondering: K+1 passes over the tokens.
        return [self.num_slots] * (self.num_extra_loops + self.num_ponder_steps + 1)
