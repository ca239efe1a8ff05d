"""Corpus -> megatron indexed datasets (`<output_prefix>_<key>_document.bin/.idx`).

Design (measured, see docs/data.md): one thread reads and parses lines and gathers ~1 MiB of text,
then the tokenizer encodes the batch with its own native thread pool (`workers` threads: rayon
for `tokenizers`, sentencepiece's pool), and the batch is appended with a single write. The
native tokenizers do the parallel work; Python only moves bytes, so worker processes would add
pickling cost without adding speed. `partitions` cuts the input into contiguous pieces processed
by separate processes (useful for many input files on many cores) and merged in input order, so
the output is byte-identical to one partition.

Bad lines never vanish: each becomes a `Problem` (counted, the first few printed with file:line,
all listed in `<output_prefix>_skipped.tsv`), or with `strict` stops the run. Outputs are written
under temporary names and renamed at the end (see `indexed.publish`).
"""

import concurrent.futures
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron_latent.data import corpus, indexed
from megatron_latent.data.tokenizer import Tokenizer

BATCH_TEXT_BYTES = 1 << 20
EXAMPLES_PER_KIND = 5


class PreprocessError(RuntimeError):
    """A fatal problem (with `strict`, any bad line); the message names file and line."""


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    strict: bool = False
    log_interval: int = 1000  # documents between progress-bar refreshes
    progress: bool = True


@dataclass
class PreprocessStats:
    files: int = 0
    input_bytes: int = 0  # bytes read from disk (compressed where compressed)
    line_bytes: int = 0  # uncompressed bytes of the lines written
    documents_read: int = 0  # lines seen, good or bad
    documents_written: int = 0
    tokens: int = 0  # per key, summed over keys; includes appended EOD tokens
    problems: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)
    problems_file: Optional[str] = None
    dtype: str = ""

    @property
    def skipped(self) -> int:
        return sum(self.problems.values())

    def merge(self, other: "PreprocessStats") -> None:
        for name in ("input_bytes", "line_bytes", "documents_read", "documents_written", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.update(other.problems)
        for kind, lines in other.examples.items():
            mine = self.examples.setdefault(kind, [])
            mine.extend(lines[: EXAMPLES_PER_KIND - len(mine)])


def output_prefixes(output_prefix: str, keys: Sequence[str]) -> List[str]:
    return [f"{output_prefix}_{key}_document" for key in keys]


class _Progress:
    """Counters a partition updates; the main process turns them into a tqdm bar."""

    def __init__(self, shared=None, slot=0, bar=None, log_interval=1000):
        self.values = [0, 0, 0, 0]  # input bytes, documents, tokens, uncompressed line bytes
        self.shared, self.slot, self.bar, self.log_interval = shared, slot, bar, log_interval
        self.shown, self.since = 0, 0

    def add_bytes(self, n):
        self.values[0] += n

    def add_docs(self, docs, tokens, text_bytes, force=False):
        self.values[1] += docs
        self.values[2] += tokens
        self.values[3] += text_bytes
        self.since += docs
        if force or self.since >= self.log_interval:
            self.since = 0
            self.publish()

    def publish(self):
        if self.shared is not None:
            for i, v in enumerate(self.values):
                self.shared[4 * self.slot + i] = v
        elif self.bar is not None:
            _show(self.bar, self.values, self.bar.start_t)


def _show(bar, values, start):
    elapsed = max(time.time() - start, 1e-9)
    bar.update(values[0] - bar.n)
    bar.set_postfix_str(
        f"{values[1] / elapsed:,.0f} docs/s, {values[2] / elapsed / 1e6:.3f} M tok/s, "
        f"{values[3] / elapsed / 1e6:.2f} MB/s uncompressed",
        refresh=False,
    )


def _run_partition(
    shards, tmp_prefixes, problems_path, tokenizer, config, threads, progress
) -> PreprocessStats:
    """Process a list of shards into one temporary dataset per key."""
    if threads and "RAYON_NUM_THREADS" not in os.environ:
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read by rayon at its first use
    stats = PreprocessStats()
    dtype = indexed.optimal_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod if config.append_eod else None
    builders = [indexed.CompactIndexedDatasetBuilder(p + ".bin", dtype=dtype) for p in tmp_prefixes]
    keys = list(config.json_keys)
    batch: List[List[str]] = [[] for _ in keys]
    batch_bytes = 0
    problems_file = None

    def flush():
        nonlocal batch, batch_bytes
        if not batch[0]:
            return
        tokens = 0
        for builder, texts in zip(builders, batch):
            ids = tokenizer.tokenize_batch(texts, num_threads=threads)
            builder.add_documents(ids, eod=eod)
            tokens += sum(map(len, ids)) + (len(ids) if eod is not None else 0)
        stats.documents_written += len(batch[0])
        stats.tokens += tokens
        stats.line_bytes += batch_bytes
        progress.add_docs(len(batch[0]), tokens, batch_bytes)
        batch, batch_bytes = [[] for _ in keys], 0

    def report(problem):
        nonlocal problems_file
        if config.strict:
            raise PreprocessError(f"{problem} (fatal because of strict=True)")
        stats.problems[problem.kind] += 1
        examples = stats.examples.setdefault(problem.kind, [])
        if len(examples) < EXAMPLES_PER_KIND:
            examples.append(str(problem))
        if problems_file is None:
            problems_file = open(problems_path, "w", encoding="utf-8")
        detail = problem.detail.replace("\t", " ").replace("\n", " ")
        problems_file.write(f"{problem.path}\t{problem.line}\t{problem.kind}\t{detail}\n")

    try:
        for shard in shards:
            text_file = corpus.is_text(shard.path)
            for lineno, line, error in corpus.iter_lines(shard, progress.add_bytes):
                if error is not None:
                    what = "an unterminated line" if line else "no partial line"
                    report(corpus.Problem("truncated", shard.path, lineno, f"{error}; {what}"))
                    stats.documents_read += bool(line)
                    continue
                stats.documents_read += 1
                texts, problem = corpus.parse_line(shard.path, lineno, line, keys, text_file)
                if problem is not None:
                    report(problem)
                    continue
                for k, text in enumerate(texts):
                    batch[k].append(text)
                batch_bytes += len(line)
                if batch_bytes >= BATCH_TEXT_BYTES:
                    flush()
        flush()
        progress.add_docs(0, 0, 0, force=True)
        for builder, prefix in zip(builders, tmp_prefixes):
            builder.finalize(prefix + ".idx")
    finally:
        if problems_file is not None:
            problems_file.close()
        for builder in builders:
            builder.data_file.close()
    stats.input_bytes = progress.values[0]
    stats.dtype = dtype.__name__
    return stats


_SHARED = None


def _init_worker(shared):
    global _SHARED
    _SHARED = shared


def _partition_worker(slot, shards, tmp_prefixes, problems_path, tokenizer, config, threads):
    progress = _Progress(shared=_SHARED, slot=slot, log_interval=config.log_interval)
    return _run_partition(shards, tmp_prefixes, problems_path, tokenizer, config, threads, progress)


def preprocess(config: PreprocessConfig, tokenizer: Tokenizer) -> PreprocessStats:
    """Run the whole conversion; returns the statistics (see `format_summary`)."""
    if config.workers < 1 or config.partitions < 1:
        raise ValueError(f"workers and partitions must be >= 1 ({config.workers}, {config.partitions})")
    files = corpus.expand_inputs(config.inputs)
    keys = list(config.json_keys)
    if len(keys) != 1 and any(corpus.is_text(p) for p in files):
        raise corpus.InputError(f"json_keys {keys}: .txt files hold one text per line, give one key")
    finals = output_prefixes(config.output_prefix, keys)
    out_dir = os.path.dirname(os.path.abspath(finals[0]))
    if not os.path.isdir(out_dir):
        raise corpus.InputError(f"output_prefix {config.output_prefix}: no directory {out_dir}")
    problems_final = f"{config.output_prefix}_skipped.tsv"
    groups = [g for g in corpus.make_shards(files, config.partitions) if g]
    part_prefixes = [
        [indexed.temporary_prefix(f if len(groups) == 1 else f"{f}_part{i}") for f in finals]
        for i in range(len(groups))
    ]
    part_problems = [f"{problems_final}.part{i}.tmp" for i in range(len(groups))]
    total_bytes = sum(os.path.getsize(p) for p in files)
    bar = _make_bar(total_bytes, config.progress)
    start = time.time()
    stats = PreprocessStats(files=len(files))
    try:
        if len(groups) == 1:
            progress = _Progress(bar=bar, log_interval=config.log_interval)
            stats.merge(_run_partition(groups[0], part_prefixes[0], part_problems[0], tokenizer,
                                       config, config.workers, progress))
            stats.dtype = indexed.optimal_dtype(tokenizer.vocab_size).__name__
        else:
            _run_partitions(groups, part_prefixes, part_problems, tokenizer, config, bar, stats)
            _merge_parts(part_prefixes, finals, tokenizer)
        stats.seconds = time.time() - start
        _collect_problems(part_problems, problems_final, stats)
        for final in finals:
            indexed.publish(indexed.temporary_prefix(final), final)
        stats.outputs = finals
    finally:
        if bar is not None:
            bar.close()
        for prefixes in part_prefixes:
            for prefix in prefixes:
                indexed.remove_pair(prefix)
        for final in finals:
            indexed.remove_pair(indexed.temporary_prefix(final))
        for path in part_problems:
            if os.path.exists(path):
                os.remove(path)
    return stats


def _make_bar(total_bytes, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, file=sys.stderr, desc="preprocess",
                dynamic_ncols=True, smoothing=0.1)


def _run_partitions(groups, part_prefixes, part_problems, tokenizer, config, bar, stats):
    ctx = multiprocessing.get_context("spawn")  # fork would inherit the tokenizer's thread pool
    processes = min(len(groups), config.workers)
    threads = max(1, config.workers // processes)
    shared = ctx.Array("q", 4 * len(groups), lock=False)
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_worker, initargs=(shared,)
    ) as pool:
        futures = [
            pool.submit(_partition_worker, i, groups[i], part_prefixes[i], part_problems[i],
                        tokenizer, config, threads)
            for i in range(len(groups))
        ]
        while True:
            done, _ = concurrent.futures.wait(futures, timeout=0.5)
            if bar is not None:
                _show(bar, [sum(shared[i::4]) for i in range(4)], bar.start_t)
            if len(done) == len(futures) or any(f.exception() for f in done):
                break
        for future in futures:  # raises the first partition error, in input order
            stats.merge(future.result())
    stats.dtype = indexed.optimal_dtype(tokenizer.vocab_size).__name__


def _merge_parts(part_prefixes, finals, tokenizer):
    dtype = indexed.optimal_dtype(tokenizer.vocab_size)
    for k, final in enumerate(finals):
        tmp = indexed.temporary_prefix(final)
        builder = indexed.CompactIndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        for prefixes in part_prefixes:
            builder.add_index(prefixes[k])
            indexed.remove_pair(prefixes[k])
        builder.finalize(tmp + ".idx")


def _collect_problems(part_problems, problems_final, stats):
    present = [p for p in part_problems if os.path.exists(p)]
    if not present:
        if os.path.exists(problems_final):
            os.remove(problems_final)  # a stale list from an earlier run would mislead
        return
    with open(problems_final, "w", encoding="utf-8") as out:
        out.write("file\tline\tkind\tdetail\n")
        for path in present:
            with open(path, encoding="utf-8") as f:
                for row in f:
                    out.write(row)
    stats.problems_file = problems_final


def format_summary(stats: PreprocessStats, tokenizer: Optional[Tokenizer] = None) -> str:
    secs = max(stats.seconds, 1e-9)
    lines = [
        f"read {stats.documents_read:,} documents from {stats.files} file(s) "
        f"({stats.input_bytes / 1e6:,.1f} MB on disk); wrote {stats.documents_written:,}; "
        f"skipped {stats.skipped:,}",
    ]
    for kind in corpus.PROBLEM_KINDS:
        if stats.problems.get(kind):
            lines.append(f"  skipped {stats.problems[kind]:,} x {kind}: {corpus.PROBLEM_KINDS[kind]}")
            lines.extend(f"    {example}" for example in stats.examples.get(kind, []))
    if stats.problems_file:
        lines.append(f"  every skipped line is listed in {stats.problems_file}")
    eod = ""
    if tokenizer is not None:
        eod = f"; EOD {tokenizer.eod_token!r} = id {tokenizer.eod}"
    lines.append(
        f"tokens {stats.tokens:,} ({stats.dtype}{eod}) in {stats.seconds:.1f} s: "
        f"{stats.documents_written / secs:,.0f} docs/s, {stats.tokens / secs / 1e6:.3f} M tok/s, "
        f"{stats.line_bytes / secs / 1e6:.2f} MB/s uncompressed"
    )
    lines.extend(f"  -> {prefix}.bin/.idx" for prefix in stats.outputs)
    return "\n".join(lines)
