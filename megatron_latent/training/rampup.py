"""The global batch of every iteration: constant, or Megatron-LM's --rampup-batch-size, on
megatron-core's micro-batch calculators.

--rampup-batch-size START INCREMENT SAMPLES grows the global batch from START by INCREMENT up to
--global-batch-size, one increment every SAMPLES / ((--global-batch-size - START) / INCREMENT)
samples; after SAMPLES samples every batch is --global-batch-size. The batch of an iteration is a
function of the samples consumed before it alone, so a resumed run (which knows its consumed
samples) takes exactly the batches of the uninterrupted one. As in Megatron-LM it needs the
sample-based schedule (--train-samples), whose steps are samples.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from megatron.core.num_microbatches_calculator import (
    ConstantNumMicroBatchesCalculator,
    RampupBatchsizeNumMicroBatchesCalculator,
)

_QUIET = -1  # the calculators log on rank 0 only; the training loop reports the changes itself


def rampup_error(rampup: Sequence[int], global_batch_size: int) -> Optional[str]:
    """Why megatron-core's calculator would refuse (or fail on) these values (START, INCREMENT,
    SAMPLES), or None."""
    start, increment, samples = rampup
    if start < 1 or increment < 1 or samples < 1:
        return f"START, INCREMENT and SAMPLES must be >= 1, got {start} {increment} {samples}"
    if start >= global_batch_size:
        return (f"START {start} must be below global_batch_size {global_batch_size} (the batch it ramps up "
                "to; without a rampup, leave it out)")
    if (global_batch_size - start) % increment:
        return (f"global_batch_size {global_batch_size} minus START {start} must be a multiple of INCREMENT "
                f"{increment}")
    return None


class BatchSizes:
    """(global batch, micro-batches per data-parallel rank) of an iteration, from the samples
    consumed before it: megatron-core's calculator, as Megatron-LM's training loop updates it."""

    def __init__(self, global_batch_size: int, micro_batch_size: int = 1, data_parallel_size: int = 1,
                 rampup: Optional[Sequence[int]] = None):
        self.global_batch_size = global_batch_size
        self.micro_batch_size, self.data_parallel_size = micro_batch_size, data_parallel_size
        self.rampup = tuple(rampup) if rampup else None
        if self.rampup is None:
            self._calculator = ConstantNumMicroBatchesCalculator(
                global_batch_size, micro_batch_size, data_parallel_size, False, _QUIET)
        else:
            error = rampup_error(self.rampup, global_batch_size)
            if error:
                raise ValueError(f"rampup_batch_size {' '.join(map(str, self.rampup))}: {error}")
            self._calculator = RampupBatchsizeNumMicroBatchesCalculator(
                global_batch_size, micro_batch_size, data_parallel_size, False, _QUIET, *self.rampup)

    def at(self, consumed_samples: int) -> Tuple[int, int]:
        """(global batch, micro-batches) of the iteration after `consumed_samples` samples. The
        micro-batch count is exact once `check_divisible` passed."""
        self._calculator.update(consumed_samples, consistency_check=False)
        return self._calculator.get_current_global_batch_size(), self._calculator.get()

    def global_batch(self, consumed_samples: int) -> int:
        return self.at(consumed_samples)[0]

    def _ramp(self, train_samples: int) -> List[int]:
        """The batches of the iterations that start within the rampup (Megatron-LM's
        update_train_iters walk)."""
        batches, consumed = [], 0
        while self.rampup and consumed <= self.rampup[2] and consumed <= train_samples:
            batches.append(self.global_batch(consumed))
            consumed += batches[-1]
        return batches

    def train_iters(self, train_samples: int) -> int:
        """Megatron-LM's iteration count for --train-samples: the rampup's iterations, then full
        batches (a partial last batch is dropped)."""
        ramp = self._ramp(train_samples)
        return len(ramp) + max(train_samples - sum(ramp), 0) // self.global_batch_size

    def stages(self, train_samples: int) -> List[int]:
        """The global batch sizes a run of `train_samples` samples trains with, smallest first."""
        return sorted(set(self._ramp(train_samples)) | {self.global_batch_size})
