"""The driver's data: tokenizer, megatron datasets, and per-rank micro-batch iterators.

Every rank reads its data-parallel slice itself (the mmap'ed indexed files make that cheap), so
no broadcast over the tensor-parallel group is needed and every pipeline stage sees the same
micro-batches in the same order (the latent first stage needs the tokens, the last the labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

from megatron_latent import platform
from megatron_latent.data.gpt_data import (
    DataArgs,
    DataConfigError,
    build_pretraining_data_loader,
    build_train_valid_test_datasets,
    checked_batches,
)
from megatron_latent.data.tokenizer import build_tokenizer


@dataclass(frozen=True)
class MockTokenizer:
    """What megatron's MockGPTDataset needs when --mock-data runs without a tokenizer."""

    vocab_size: int

    @property
    def eod(self) -> int:
        return self.vocab_size - 1

    @property
    def unique_identifiers(self) -> dict:  # part of megatron's dataset cache key
        return {"class": "MockTokenizer", "vocab_size": self.vocab_size}


def build_tokenizer_from_args(args):
    """The tokenizer the flags name, or None (--mock-data without --tokenizer-type)."""
    if args.tokenizer_type is None:
        return None
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)


def build_datasets(args, tokenizer, seq_length: int, train_samples: int, eval_samples: Optional[int]):
    """(train, valid, test) megatron GPT datasets; valid and test hold `eval_samples` each (as
    Megatron: --eval-iters global batches) and are None when their split has no weight."""
    data_args = DataArgs(
        seq_length=seq_length,
        data_path=args.data_path,
        split=args.split,
        train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        data_cache_path=args.data_cache_path,
        seed=args.seed,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        # The model expands a token-level mask to its slots; it is only needed for document resets.
        create_attention_mask=args.reset_attention_mask,
        mock_data=args.mock_data,
        mmap_bin_files=args.mmap_bin_files,
    )
    if args.mock_data:
        # megatron logs that mock datasets have no index cache to save, once per split
        logging.getLogger("megatron.core.datasets").setLevel(logging.ERROR)
    per_split = [train_samples, eval_samples, eval_samples]
    if args.train_data_path:  # separate paths per split: a missing one is simply not built
        per_split[1] = eval_samples if args.valid_data_path else None
        per_split[2] = eval_samples if args.test_data_path else None
    return build_train_valid_test_datasets(data_args, tokenizer, per_split)


def to_device(batch: dict) -> dict:
    """A micro-batch on the training device."""
    device = platform.device()
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 0, on_device: bool = True, vocab_size: Optional[int] = None) -> Iterator[dict]:
    """Endless-as-the-dataset iterator of this rank's micro-batches from `consumed_samples` on,
    on the training device unless `on_device` is False. A resumed run passes its checkpoint's
    consumed_samples. With `vocab_size`, a token id at or past it stops with DataConfigError."""
    loader = build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size,
                                           num_workers=num_workers, vocab_size=vocab_size)
    for batch in checked_batches(loader):
        yield to_device(batch) if on_device else batch


def take(iterator: Iterator[dict], n: int, what: str = "training") -> list:
    """The next `n` micro-batches, or a clear error when the data runs out."""
    out = []
    for _ in range(n):
        try:
            out.append(next(iterator))
        except StopIteration:
            raise RuntimeError(
                f"the {what} data ran out: more samples were drawn than the datasets were built for"
            ) from None
    return out



def take_on_every_rank(iterator: Iterator[dict], n: int) -> list:
    """`take` of the training batches, with a bad sample (DataConfigError: a token id past the
    vocabulary) agreed on by every rank: each reads its own data-parallel slice, so one rank
    alone may find it, and the others must not go on into the step's collectives and wait for
    it. Every rank raises the finding rank's message. One small all-reduce per step."""
    import torch
    import torch.distributed as dist

    error = None
    try:
        out = take(iterator, n)
    except DataConfigError as e:
        error, out = e, None
    if not dist.is_initialized():
        if error is not None:
            raise error
        return out
    failed = torch.tensor([int(error is not None)], device=platform.device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, str(error) if error is not None else None)
        raise DataConfigError(next(m for m in messages if m))
    return out
