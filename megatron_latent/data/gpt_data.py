"""Training data on megatron-core: `GPTDataset` splits and blends via
`BlendedMegatronDatasetBuilder`, and a sampler that resumes from `consumed_samples`.

Free of CLI parsing: the training driver fills a `DataArgs` from its flags (`--data-path`,
`--split`, `--train-data-path`/`--valid-data-path`/`--test-data-path`, `--data-cache-path`,
`--seq-length`, `--seed`, ...) and calls `build_train_valid_test_datasets`. Sample counts are
documented in docs/data.md ("Sample accounting").
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_latent.data.indexed import verify


class DataConfigError(ValueError):
    """Inconsistent data settings or missing dataset files; the message names the DataArgs field or file."""


@dataclass
class DataArgs:
    seq_length: int
    data_path: Optional[List[str]] = None  # ["A"] or ["0.3", "A", "0.7", "B"]
    split: Optional[str] = "969,30,1"
    train_data_path: Optional[List[str]] = None
    valid_data_path: Optional[List[str]] = None
    test_data_path: Optional[List[str]] = None
    data_cache_path: Optional[str] = None
    seed: int = 1234
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False  # the model builds its own (slot-interleaved) mask
    mmap_bin_files: bool = True
    num_dataset_builder_threads: int = 1
    mock_data: bool = False


def _check_prefixes(field: str, blend) -> None:
    if blend is None:
        return
    for prefix in blend[0]:
        if not IndexedDataset.exists(prefix):
            raise DataConfigError(
                f"{field}: no dataset {prefix}.bin/.idx (give the prefix without .bin/.idx; "
                "preprocess_data.py names it <output-prefix>_text_document)"
            )
        # The index against itself and the .bin's size: a truncated copy or a damaged index is
        # found here, not as an EOFError mid-run. Token ids are checked as samples are read.
        problems = verify(prefix)
        if problems:
            raise DataConfigError(f"{field}: {problems[0]}")


def make_gpt_dataset_config(args: DataArgs, tokenizer) -> GPTDatasetConfig:
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    if args.mock_data:
        blend, blend_per_split, split = None, None, None
    elif any(p is not None for p in per_split):
        if args.data_path is not None:
            raise DataConfigError("data_path and train_data_path/valid_data_path/test_data_path are exclusive")
        blend, split = None, None
        blend_per_split = [get_blend_from_list(p) for p in per_split]
        for name, b in zip(("train_data_path", "valid_data_path", "test_data_path"), blend_per_split):
            _check_prefixes(name, b)
    elif args.data_path is not None:
        blend, blend_per_split, split = get_blend_from_list(list(args.data_path)), None, args.split
        if not split:
            raise DataConfigError("data_path needs DataArgs.split (e.g. 969,30,1)")
        _check_prefixes("data_path", blend)
    else:
        raise DataConfigError("give data_path, train_data_path/valid_data_path/test_data_path, or mock_data=True")
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask,
    )


def build_train_valid_test_datasets(
    args: DataArgs,
    tokenizer,
    num_samples: Sequence[Optional[int]],
):
    """(train, valid, test) datasets, each None where its split is empty or not built here.

    Distributed-aware (call on every rank): with torch.distributed initialised, rank 0 builds
    first and writes the index caches to `data_cache_path`, the others wait at a barrier and then
    read them."""
    config = make_gpt_dataset_config(args, tokenizer)
    _check_nonempty_splits(config, num_samples)
    blended = any(b is not None and len(b[0]) > 1 for b in (config.blend_per_split or [config.blend]))
    if blended and config.path_to_cache and not torch.distributed.is_initialized():
        # megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() when caching
        raise DataConfigError(
            "data_cache_path with a blend needs torch.distributed initialised (world size 1 is "
            "fine); the training driver does this before building data")
    cls = MockGPTDataset if config.mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config)
    train, valid, test = builder.build()
    return train, valid, test


_SPLIT_NAMES = ("train", "valid", "test")


def _check_nonempty_splits(config: GPTDatasetConfig, num_samples) -> None:
    """megatron-core 0.16.1 loops forever in `GPTDataset._get_num_epochs` when a split that is
    asked for samples holds no tokens (e.g. `--split 969,30,1` on a dataset of fewer than ~500
    documents rounds the test split to nothing). Catch that here with a clear message. The
    document ranges are computed exactly as the builder computes them."""
    if config.mock:
        return
    checks = []  # (field, prefix, split index, (begin, end) fractions)
    if config.blend_per_split is not None:
        fields = ("train_data_path", "valid_data_path", "test_data_path")
        for i, blend in enumerate(config.blend_per_split):
            for prefix in blend[0] if blend else []:
                checks.append((fields[i], prefix, i, (0.0, 1.0)))
    else:
        for prefix in config.blend[0]:
            for i, bookends in enumerate(config.split_matrix):
                if bookends is not None:
                    checks.append(("data_path", prefix, i, bookends))
    for field, prefix, i, (lo, hi) in checks:
        if num_samples[i] is None:
            continue  # one epoch of whatever is there, no loop
        dataset = IndexedDataset(prefix, mmap=True)
        # a copy: the array is a view of an mmap that closes with `dataset`
        lengths = numpy.array(dataset.sequence_lengths, dtype=numpy.int64)
        del dataset
        begin, end = int(round(lo * float(len(lengths)))), int(round(hi * float(len(lengths))))
        if int(lengths[begin:end].sum()) == 0:
            raise DataConfigError(
                f"{field} {prefix}: the {_SPLIT_NAMES[i]} split (documents {begin}..{end} of "
                f"{len(lengths)}) holds no tokens but {num_samples[i]} samples were requested; "
                "change DataArgs.split (e.g. a 0 weight for that split) or use more data")


class MegatronPretrainingSampler:
    """Batch sampler with megatron's `MegatronPretrainingSampler` semantics: walk sample indices
    consumed_samples, consumed_samples + 1, ... in global batches of micro_batch_size * dp_size,
    and give data-parallel rank r the r-th micro-batch slice of each. Resuming with the
    checkpoint's consumed_samples continues exactly where training stopped."""

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                 data_parallel_size, drop_last=True):
        if total_samples <= 0:
            raise DataConfigError(f"no samples to draw (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise DataConfigError(f"consumed_samples {consumed_samples} >= total {total_samples}")
        if micro_batch_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise DataConfigError(
                f"bad micro_batch_size {micro_batch_size} / dp rank {data_parallel_rank} of "
                f"{data_parallel_size}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.drop_last = micro_batch_size, drop_last
        self.rank, self.size = data_parallel_rank, data_parallel_size
        self.global_micro = micro_batch_size * data_parallel_size

    def __len__(self):
        return self.total_samples

    def _slice(self, batch):
        start = self.rank * self.micro_batch_size
        return batch[start : start + self.micro_batch_size]

    def __iter__(self):
        batch = []
        for idx in range(self.consumed_samples, self.total_samples):
            batch.append(idx)
            if len(batch) == self.global_micro:
                yield self._slice(batch)
                batch = []
        if batch and not self.drop_last:
            tail = self._slice(batch)
            if tail:
                yield tail


class TokenRangeChecked(torch.utils.data.Dataset):
    """`dataset` whose samples are checked to hold token ids below `vocab_size` as they are read
    (one max per sample, nothing at start-up): an id past the model's vocabulary stops the run
    with DataConfigError naming the dataset file, instead of an IndexError in the embedding."""

    def __init__(self, dataset, vocab_size: int):
        self.dataset, self.vocab_size = dataset, vocab_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = self.dataset[idx]
        top = max(int(sample[k].max()) for k in ("tokens", "labels") if k in sample and sample[k].numel())
        if top >= self.vocab_size:
            raise DataConfigError(f"{_source(self.dataset, idx)}: token id {top} >= the model's vocabulary size "
                                  f"{self.vocab_size} (sample {idx}); was it tokenized with another tokenizer?")
        return sample


def _source(dataset, idx) -> str:
    """The .bin file sample `idx` of a (blended) GPT dataset comes from."""
    if hasattr(dataset, "dataset_index"):  # BlendedDataset
        inner = dataset.datasets[int(dataset.dataset_index[idx])]
        return _source(inner, int(dataset.dataset_sample_index[idx]))
    prefix = getattr(getattr(dataset, "dataset", None), "path_prefix", None)
    return f"{prefix}.bin" if prefix else type(dataset).__name__


def checked_batches(loader):
    """Iterate `loader`; a DataConfigError raised in a worker process (which the DataLoader re-raises
    with the worker's traceback in its message) comes out as its one original line."""
    try:
        yield from loader
    except DataConfigError as e:
        text = str(e).strip()
        marker = "DataConfigError: "
        raise DataConfigError(text[text.rindex(marker) + len(marker):] if "Original Traceback" in text
                              and marker in text else text) from None


def build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size, data_parallel_rank,
                                  data_parallel_size, num_workers=0, vocab_size: Optional[int] = None):
    """DataLoader over `dataset` driven by `MegatronPretrainingSampler` (its samples' token ids
    checked against `vocab_size` when given: TokenRangeChecked)."""
    if dataset is None:
        return None
    if vocab_size is not None:
        dataset = TokenRangeChecked(dataset, vocab_size)
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=False, persistent_workers=num_workers > 0,
                                       worker_init_fn=_ignore_sigterm if num_workers > 0 else None)


def _ignore_sigterm(worker_id: int) -> None:
    """Schedulers (SLURM, torchrun's agent) send SIGTERM to every process of a job, loader workers
    included; a worker that died of it makes the trainer raise at its next batch, before it can
    save (--exit-signal-handler). Workers leave it to the trainer and exit when it does."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
