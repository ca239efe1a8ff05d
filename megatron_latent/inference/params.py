"""What a caller asks of generation, as two values checked once: how the next token is chosen
(`SamplingParams`) and how the prompt's thoughts are found (`PrefillParams`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

PREFILL_MODES = ("exact", "jacobi", "tolerance")


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: Optional[int] = None
    vocab_size: Optional[int] = None  # ids >= vocab_size (padded output rows) are never chosen

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy for argmax)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")


@dataclass(frozen=True)
class PrefillParams:
    """How the prompt's thoughts are found (LatentKVDecoder.prefill):

    jacobi      (the default) the training forward's growth and `jacobi_iters` Jacobi passes (None:
                the model's jacobi_iters_eval); on trained models the evaluation J gives the exact
                rollout's loss and accuracy (docs/benchmarks/prefill-passes-202612.md) in N + J + 1
                parallel passes instead of (N+1) P sequential steps;
    exact       slot by slot, as the sequential reference;
    tolerance   Jacobi passes until no thought moves by more than `tol`, at most
                `max_jacobi_iters` (None: P * N, where the causal Jacobi map is exact).
    """

    mode: str = "jacobi"
    jacobi_iters: Optional[int] = None
    tol: Optional[float] = None
    max_jacobi_iters: Optional[int] = None

    def __post_init__(self):
        if self.mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode {self.mode!r}: choose one of {', '.join(PREFILL_MODES)}")
        if self.jacobi_iters is not None and (self.mode != "jacobi" or self.jacobi_iters < 0):
            raise ValueError(f"jacobi_iters {self.jacobi_iters}: needs mode 'jacobi' and a value >= 0")
        if self.mode == "tolerance":
            if self.tol is None or not self.tol > 0:
                raise ValueError(f"mode 'tolerance' needs tol > 0, got {self.tol}")
        elif self.tol is not None:
            raise ValueError(f"tol {self.tol} needs mode 'tolerance' (mode is {self.mode!r})")
        if self.max_jacobi_iters is not None and (self.mode != "tolerance" or self.max_jacobi_iters < 1):
            raise ValueError(f"max_jacobi_iters {self.max_jacobi_iters}: needs mode 'tolerance' and a value >= 1")
