"""What every dataset pipeline shares: host sharding, deterministic order,
resumable state, and counted skipping of bad records.

Stream, per host (the records come from a `RecordSource`: `FileSource` for our
TFRecord shards, as below, or `tfds_source.TfdsSource` for a prepared TFDS split):
  files matching the pattern, sorted (one coherent shard set per dataset name,
  see `formats.check_shard_sets`); this host takes files[process_index::process_count]
  -> per epoch: file order shuffled (stateless, from seed and epoch), records
     read by `records.read_records` (damage in a file, such as a checksum
     mismatch, a cut-off record or a file that cannot be read, is an item of
     the stream with its reason, so it is skipped and counted like a bad
     record), interleaved across files
  -> shuffled in a buffer (seeded by seed and epoch)
  -> each raw record gets its position in the epoch's stream: (epoch, position)
  -> [restore] skip the first `position` raw records of the saved epoch: only
     serialized bytes are skipped, nothing is parsed, tokenised or decoded
  -> parse, validate, tokenise, decode (the kind's `_process`, parallel,
     deterministic); all randomness there is stateless, seeded by
     (seed, epoch, position), so an element is the same whether reached by
     running or by restoring
  -> bad records (reason != 0) are logged with shard file and record index
     (damage: with its byte offset), tallied and filtered out -> batch -> prefetch.

State = (epoch, position after the last record of the last batch handed out,
skip counts): a small JSON-serialisable dict. Restoring it rebuilds the stream
and skips raw records, so batches k+1, ... are exactly the uninterrupted run's.
State is per host: save each host's state (e.g. keyed by process index).

Skip tallies travel with the batches: a `scan` collects the reasons of the bad
records since the last good one and attaches them to the next good record, so
`skip_counts()` counts exactly the records behind the batches handed out (a
finite stream ends with a sentinel that carries the tail's tally). A dataset
that is mostly damaged stops the run: once `skip_check_min_records` records
were read, more than `max_skip_fraction` of them skipped is an error naming the
dataset and the files with the most skips.
"""

from __future__ import annotations

import abc
import atexit
import collections
import gc
import json
import os
import weakref
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from flamingo_jax.data import formats, images, records
from flamingo_jax.data._tf import as_written, tf
from flamingo_jax.data.errors import DamagedData, DataError, DataFileMissing

# Reason codes: 0 = good record; i > 0 = SKIP_REASONS[i - 1]. Codes live inside one run's graph;
# saved states and logs use the names.
SKIP_REASONS = ("malformed", "empty_text", "no_image", "too_many_images", *images.DECODE_FAILURES,
                *records.DAMAGE_KINDS)
REASON_CODE = {name: i + 1 for i, name in enumerate(SKIP_REASONS)}
_DAMAGE_CODE = {"": 0, **{kind: REASON_CODE[kind] for kind in records.DAMAGE_KINDS}}
_SENTINEL = -1  # marks the end of a finite stream
_STATE_VERSION = 1


_OPEN_PIPELINES: weakref.WeakSet[RecordPipeline] = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _close_all() -> None:
    """Stops every live tf.data iterator before the interpreter shuts down: a
    prefetch thread still inside a numpy_function at shutdown aborts the process."""
    for pipeline in list(_OPEN_PIPELINES):
        pipeline.close()
    gc.collect()


def default_process() -> tuple[int, int]:
    """(process_index, process_count) from JAX: one data pipeline per host."""
    import jax

    return jax.process_index(), jax.process_count()


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """The given (process_index, process_count), JAX's for whichever is None."""
    if process_index is None or process_count is None:
        default_index, default_count = default_process()
        process_index = default_index if process_index is None else process_index
        process_count = default_count if process_count is None else process_count
    return process_index, process_count


def host_files(files: Sequence[str], process_index: int, process_count: int, what: str) -> list[str]:
    """This host's share of the files: every `process_count`-th, starting at `process_index`.

    Whole files per host: disjoint and, over all hosts, complete.
    """
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if len(files) < process_count:
        raise DataError(
            f"{what}: {len(files)} file(s) for {process_count} data-loading processes; every process reads "
            f"whole files, so write at least {process_count} shards (e.g. prepare --num_shards={process_count})."
        )
    return list(files[process_index::process_count])


def numpy_rng(seed_ints: np.ndarray) -> np.random.Generator:
    """The numpy generator of one record, from its (seed, epoch, position).

    A Philox key built directly from the three numbers (31, 32 and 64 bits:
    distinct records get distinct keys) skips SeedSequence hashing, the
    costliest part of making a generator per record.
    """
    base, epoch, position = (int(v) for v in seed_ints)
    return np.random.Generator(np.random.Philox(key=[(base << 32) | (epoch & 0xFFFFFFFF), position]))


_READ_BATCH_RECORDS = 128  # records per call from the reader into tf.data (each call costs ~1 ms) ...
_READ_BATCH_BYTES = 4 << 20  # ... or fewer, when they are large: bounds the read-ahead per open file


def _file_records(path: bytes) -> Iterator[tuple[np.ndarray, ...]]:
    """`records.read_records` for `tf.data.Dataset.from_generator`, in batches of columns
    (index, offset, data, damage code, detail), to be unbatched in the graph."""
    batch: list[records.Record] = []
    size = 0
    for record in records.read_records(path.decode("utf-8")):
        batch.append(record)
        size += len(record.data)
        if len(batch) == _READ_BATCH_RECORDS or size >= _READ_BATCH_BYTES:
            yield _columns(batch)
            batch, size = [], 0
    if batch:
        yield _columns(batch)


def _columns(batch: list[records.Record]) -> tuple[np.ndarray, ...]:
    strings = lambda values: np.array(values, dtype=object)  # noqa: E731 - never numpy 'S': it drops trailing NULs
    return (np.array([r.index for r in batch], np.int64), np.array([r.offset for r in batch], np.int64),
            strings([r.data for r in batch]), np.array([_DAMAGE_CODE[r.damage] for r in batch], np.int32),
            strings([r.detail.encode() for r in batch]))


def _seed_int(*parts: Any) -> int:
    """A stable 31-bit seed from parts (crc32, not Python's salted hash)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


class RecordSource(abc.ABC):
    """Where a pipeline's raw records come from. `for_host` binds one host's share and
    checks that it exists (before anything compiles); the bound source gives, per epoch, the
    records in a fixed order as (source, index, byte offset, serialized record, damage code,
    damage detail) tuples, which the pipeline shuffles, positions, skips and processes."""

    files: list[str]  # what this host reads, for messages (files, or a TFDS split)
    description: str = ""

    @abc.abstractmethod
    def for_host(self, process_index: int, process_count: int, *, name: str, seed: int,
                 training: bool) -> RecordSource:
        """This host's share, checked."""

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What a saved position refers to: a restore needs the same values."""

    @abc.abstractmethod
    def records(self, epoch: Any, base_seed: Any, shuffle: bool, cycle_length: int) -> Any:
        """The epoch's raw records (graph mode: `epoch` and `base_seed` are int64 tensors)."""


class FileSource(RecordSource):
    """TFRecord shards matching a pattern; each host reads whole files (`host_files`)."""

    def __init__(self, pattern: str | Sequence[str]):
        self.pattern = pattern
        self.files: list[str] = []
        self.description = repr(pattern)

    def for_host(self, process_index: int, process_count: int, *, name: str, seed: int,
                 training: bool) -> FileSource:
        del seed, training  # file order and record randomness are the pipeline's
        pattern = self.pattern
        all_files = formats.list_files(pattern)
        if not all_files:
            raise DataFileMissing(
                f"dataset {name!r}: no files match {pattern!r}; check the path, or write shards with "
                "`python -m flamingo_jax.data.prepare` or `python -m flamingo_jax.data.synthetic`."
            )
        for problem in formats.check_shard_sets(all_files, f"dataset {name!r} ({pattern!r})"):
            logging.warning("%s", problem)
        bound = FileSource(pattern)
        bound.files = host_files(all_files, process_index, process_count, f"dataset {name!r} ({pattern!r})")
        if all(_file_size(f) == 0 for f in bound.files):
            raise DataError(f"dataset {name!r}: this host's files {bound.files} are all empty (or unreadable).")
        bound.description = f"{len(bound.files)} files from {pattern!r}"
        return bound

    def identity(self) -> dict[str, Any]:
        return {"num_files": len(self.files)}

    def records(self, epoch: Any, base_seed: Any, shuffle: bool, cycle_length: int) -> Any:
        t = tf()
        files, num_files = t.constant(self.files), len(self.files)
        cycle_length = max(1, min(cycle_length, num_files))

        def read_file(path):
            items = t.data.Dataset.from_generator(_file_records, args=(path,), output_signature=(
                t.TensorSpec([None], t.int64), t.TensorSpec([None], t.int64), t.TensorSpec([None], t.string),
                t.TensorSpec([None], t.int32), t.TensorSpec([None], t.string))).unbatch()
            return items.map(as_written(lambda index, offset, data, damage, detail: (
                path, index, offset, data, damage, detail)))

        order = t.range(num_files)
        if shuffle:
            order = t.random.experimental.stateless_shuffle(order, seed=t.stack([base_seed, epoch]))
        parallel = {"num_parallel_calls": cycle_length, "deterministic": True} if cycle_length > 1 else {}
        return t.data.Dataset.from_tensor_slices(t.gather(files, order)).interleave(
            as_written(read_file), cycle_length=cycle_length, block_length=1, **parallel)


class RecordPipeline(abc.ABC):
    """Base of the per-kind pipelines: an iterator of batches (dicts of numpy arrays).

    `max_skip_fraction` of the records read may be skipped (bad records and
    damaged stretches of files alike) before the pipeline stops with an error;
    the check starts after `skip_check_min_records` records.

    `training` turns on every augmentation (image flips and colour jitter, random
    interleaved windows, p_next, the leading space of captions, random video
    start) and, unless `shuffle` says otherwise, shuffling; with it off, batches
    are a plain function of the records, in file order.

    Subclasses set `kind` and implement `_process(example) -> dict` in graph
    mode. `example` has 'serialized' (string), 'seed' (int64 [2], stateless
    RNG seed), 'seed_ints' (int64 [3], (seed, epoch, position) for numpy
    RNGs). The result holds the model fields (fixed shapes), 'reason' (int32
    scalar) and 'detail' (string scalar, for the log line). The subclasses
    parse, validate, tokenise and decode the images they keep in one Python
    step (`tf.numpy_function`, where a bad record is a return code, not an
    exception), then resize, augment and normalise those images in the graph.
    """

    kind: str = ""

    def __init__(
        self,
        pattern: str | Sequence[str] | RecordSource,  # TFRecord glob(s), or another source of records
        batch_size: int,
        *,
        name: str | None = None,
        seed: int = 0,
        training: bool = True,
        shuffle: bool | None = None,
        shuffle_buffer: int = 1000,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        cycle_length: int = 8,
        num_parallel_calls: int | None = None,
        prefetch: int = 2,
        max_skip_fraction: float = 0.1,
        skip_check_min_records: int = 1000,
    ):
        self.name = name or self.kind
        if batch_size < 1:
            raise DataError(f"dataset {self.name!r}: batch_size={batch_size} must be >= 1.")
        if num_epochs is not None and num_epochs < 1:
            raise DataError(f"dataset {self.name!r}: num_epochs={num_epochs} must be >= 1 or None (forever).")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise DataError(f"dataset {self.name!r}: max_skip_fraction={max_skip_fraction} must be in [0, 1] "
                             "(1 turns the check off).")
        process_index, process_count = resolve_process(process_index, process_count)
        source = pattern if isinstance(pattern, RecordSource) else FileSource(pattern)
        self.source = source.for_host(process_index, process_count, name=self.name,
                                      seed=_seed_int(seed, self.name, process_index), training=training)
        self.files = self.source.files
        self.pattern = pattern
        self.batch_size = batch_size
        self.seed = int(seed)
        self.training = training
        self.shuffle = training if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.process_index = process_index
        self.process_count = process_count
        self.cycle_length = cycle_length
        self.num_parallel_calls = num_parallel_calls
        self.prefetch = prefetch
        self.max_skip_fraction = float(max_skip_fraction)
        self.skip_check_min_records = int(skip_check_min_records)
        self._base_seed = _seed_int(self.seed, self.name, process_index)
        self._epoch = 0
        self._position = 0
        self._batches = 0
        self._records = 0  # good records handed out in batches
        self._skips = np.zeros(len(SKIP_REASONS), np.int64)
        self._skips_by_file: collections.Counter[str] = collections.Counter()  # for error messages only
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None

    # ------------------------------------------------------------ to implement
    @abc.abstractmethod
    def _process(self, example: dict[str, Any]) -> dict[str, Any]:
        """One parsed record -> the batch fields plus `reason`/`detail` (graph mode)."""

    # ------------------------------------------------------------ public API
    def __iter__(self) -> RecordPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            global _EXIT_HOOK_REGISTERED
            self._iterator = self._build(self._epoch, self._position).as_numpy_iterator()
            _OPEN_PIPELINES.add(self)
            if not _EXIT_HOOK_REGISTERED:  # after TensorFlow's own hooks, so it runs before them
                atexit.register(_close_all)
                _EXIT_HOOK_REGISTERED = True
        while True:
            batch = next(self._iterator)
            sentinel = batch.pop("_sentinel")
            self._skips += batch.pop("_skips").sum(axis=0)
            if batch.pop("_empty_epoch").any():
                self.close()
                raise DamagedData(
                    f"dataset {self.name!r}: a whole epoch of files {self.files} held no valid record "
                    f"(skipped: {self.skip_counts()}); fix the data or drop the dataset."
                )
            epochs, positions = batch.pop("_epoch"), batch.pop("_position")
            if sentinel.any():
                keep = ~sentinel
                batch = {key: value[keep] for key, value in batch.items()}
                epochs, positions = epochs[keep], positions[keep]
            if len(epochs) == 0 or (self.drop_remainder and len(epochs) < self.batch_size):
                continue  # only the end of a finite stream is short
            self._epoch, self._position = int(epochs[-1]), int(positions[-1]) + 1
            self._batches += 1
            self._records += len(epochs)
            self._check_skip_fraction()
            return batch

    def _check_skip_fraction(self) -> None:
        skipped = int(self._skips.sum())
        seen = skipped + self._records
        if seen < max(1, self.skip_check_min_records) or skipped <= self.max_skip_fraction * seen:
            return
        self.close()
        worst = ", ".join(f"{path} ({count})" for path, count in self._skips_by_file.most_common(3))
        counts = {reason: count for reason, count in self.skip_counts().items() if count}
        raise DamagedData(
            f"dataset {self.name!r}: {skipped} of {seen} records read were skipped ({skipped / seen:.0%} > "
            f"max_skip_fraction={self.max_skip_fraction}): {counts}; most in {worst or 'its files'} "
            f"({self.source.description}).\n"
            "Repair or re-import those files (python -m flamingo_jax.data.prepare), leave them out of the pattern, "
            "or raise this dataset's max_skip_fraction."
        )

    def close(self) -> None:
        """Stops the background tf.data work; iterating again restarts from the current state."""
        self._iterator = None
        _OPEN_PIPELINES.discard(self)

    def __del__(self) -> None:
        # Stop the iterator while `self` still exists: its in-flight Python calls need it.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn module globals down
            pass

    def skip_counts(self) -> dict[str, int]:
        """Records skipped so far, by reason (records behind the batches handed out)."""
        return {reason: int(count) for reason, count in zip(SKIP_REASONS, self._skips)}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of this host's stream (after the last batch handed out)."""
        return {
            "version": _STATE_VERSION,
            "name": self.name,
            "kind": self.kind,
            "seed": self.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            **self.source.identity(),
            "epoch": self._epoch,
            "position": self._position,
            "batches": self._batches,
            "records": self._records,
            "skip_counts": self.skip_counts(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the pipeline that produced `state` stopped."""
        if isinstance(state, str):
            state = json.loads(state)
        expected = {"version": _STATE_VERSION, "kind": self.kind, "seed": self.seed,
                    "process_index": self.process_index, "process_count": self.process_count,
                    **self.source.identity()}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(
                    f"dataset {self.name!r}: saved iterator state has {key}={state.get(key)!r} but this pipeline "
                    f"has {key}={value!r}; the saved position only means something for the same files, seed and "
                    "host layout. Restore with the original setup, or start this dataset's stream afresh "
                    "(do not call set_state)."
                )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._batches = int(state.get("batches", 0))
        self._records = int(state.get("records", self._batches * self.batch_size))
        counts = state.get("skip_counts", {})
        self._skips = np.array([int(counts.get(reason, 0)) for reason in SKIP_REASONS], np.int64)
        self.close()

    # ------------------------------------------------------------ the tf.data graph
    def _python(self, method_name: str, orphan: Any) -> Any:
        """`self.<method_name>` for `tf.numpy_function`, holding `self` weakly: the traced graph
        keeps its Python functions alive, and a strong reference would keep a dropped pipeline,
        its iterator and its threads alive until the next garbage collection. A call still in
        flight when the pipeline is freed returns `orphan` (a result of the right types, never
        read: its iterator is gone); raising instead made TensorFlow log a traceback at exit."""
        pipeline = weakref.ref(self)

        def call(*args):
            owner = pipeline()
            return orphan if owner is None else getattr(owner, method_name)(*args)

        return call

    @staticmethod
    def refused_fields(length: int, reason: int, detail: str) -> tuple:
        """A `_sample` result for a record that is skipped: token fields of `length`, no pixels, the reason."""
        zeros = np.zeros(length, np.int32)
        return (zeros, zeros, zeros.astype(np.float32), zeros - 1, np.zeros([0], np.uint8),
                np.zeros([0, 2], np.int32), np.int32(reason), detail.encode())

    def _sample_step(self, length: int) -> Any:
        """`self._sample` for the graph; once the pipeline is freed, a refused record's fields."""
        freed = self.refused_fields(length, REASON_CODE["malformed"], "the input pipeline was freed")
        return self._python("_sample", orphan=freed)

    def _sample_in_graph(self, example: dict[str, Any], length: int) -> tuple:
        """The record's Python step (`self._sample`, shaped as `refused_fields`) in the graph:
        tokens, targets, loss_mask, media_index [length], pixels, shapes, reason, detail."""
        t = tf()
        return t.numpy_function(
            self._sample_step(length), [example["serialized"], example["seed_ints"]],
            [t.int32, t.int32, t.float32, t.int32, t.uint8, t.int32, t.int32, t.string], stateful=False)

    def _build(self, start_epoch: int, start_position: int) -> Any:
        t = tf()
        parallel_calls = self.num_parallel_calls or os.cpu_count() or 1
        base_seed = t.constant(self._base_seed, t.int64)
        shuffle, buffer = self.shuffle, self.shuffle_buffer
        source = self.source

        def epoch_records(epoch):
            raw = source.records(epoch, base_seed, shuffle, self.cycle_length)
            if shuffle and buffer > 1:
                raw = raw.shuffle(buffer, seed=(base_seed * 1_000_003 + epoch * 7_919 + 1) % 2_147_483_647)
            raw = raw.enumerate().skip(
                t.where(epoch == start_epoch, t.constant(start_position, t.int64), t.constant(0, t.int64)))
            return raw.map(as_written(lambda position, r: {
                "epoch": epoch, "position": position, "file": r[0], "index": r[1], "offset": r[2],
                "serialized": r[3], "damage": r[4], "damage_detail": r[5]}))

        last_epoch = (1 << 62) if self.num_epochs is None else self.num_epochs
        stream = t.data.Dataset.range(start_epoch, last_epoch).flat_map(as_written(epoch_records))

        pipeline = weakref.proxy(self)  # the traced graph keeps `process`; it must not keep `self`
        log_skip = self._python("_log_skip", orphan=np.int32(REASON_CODE["malformed"]))

        def process(example):
            seed = t.random.experimental.stateless_fold_in(
                t.stack([base_seed, example["epoch"]]), example["position"])
            example = dict(example, seed=seed,
                           seed_ints=t.stack([base_seed, example["epoch"], example["position"]]))
            out = pipeline._process(example)  # a damage item has empty bytes: a cheap skip, overruled here
            damaged = example["damage"] > 0
            reason = t.where(damaged, example["damage"], t.reshape(out["reason"], []))
            detail = t.where(damaged, example["damage_detail"], t.reshape(out["detail"], []))
            reason = t.cond(reason > 0,
                            lambda: t.numpy_function(log_skip, [reason, example["file"], example["index"],
                                                                example["offset"], detail], t.int32, stateful=True),
                            lambda: reason)
            out = {k: v for k, v in out.items() if k not in ("reason", "detail")}
            out.update(_reason=t.reshape(reason, []), _epoch=example["epoch"], _position=example["position"])
            return out

        processed = stream.map(as_written(process), num_parallel_calls=parallel_calls, deterministic=True)
        if self.num_epochs is not None:
            processed = processed.concatenate(t.data.Dataset.from_tensors(_sentinel_like(processed.element_spec)))

        num_reasons = len(SKIP_REASONS)

        def tally(state, element):
            pending, current_epoch, seen_valid, stopped = state
            reason, epoch = element["_reason"], element["_epoch"]
            # A new epoch began after one (started from its beginning) that had no valid record: the
            # data holds no valid record at all. Flag this element and end the stream after it.
            whole_epoch = t.logical_or(current_epoch > start_epoch, start_position == 0)
            empty_epoch = t.logical_and(
                t.logical_and(epoch > current_epoch, current_epoch >= 0),
                t.logical_and(t.logical_not(seen_valid), whole_epoch))
            seen_valid = t.logical_or(t.logical_and(seen_valid, epoch == current_epoch), reason == 0)
            bad = t.logical_and(reason > 0, t.logical_not(empty_epoch))
            one_hot = t.one_hot(t.maximum(reason - 1, 0), num_reasons, dtype=t.int64)
            element = dict(element, _skips=t.where(bad, t.zeros_like(pending), pending),
                           _empty_epoch=empty_epoch, _stop=stopped)
            pending = t.where(bad, pending + one_hot, t.zeros_like(pending))
            new_state = (pending, t.maximum(epoch, current_epoch), seen_valid, t.logical_or(stopped, empty_epoch))
            return new_state, element

        initial = (t.zeros([num_reasons], t.int64), t.constant(-1, t.int64), t.constant(False), t.constant(False))
        batches = (
            processed.scan(initial, as_written(tally))
            .take_while(as_written(lambda e: t.logical_not(e["_stop"])))
            .filter(as_written(lambda e: t.logical_or(e["_reason"] <= 0, e["_empty_epoch"])))
            .map(as_written(lambda e: dict({k: v for k, v in e.items() if k not in ("_reason", "_stop")},
                                           _sentinel=t.logical_or(e["_reason"] == _SENTINEL, e["_empty_epoch"]))))
            .batch(self.batch_size)
            .prefetch(self.prefetch)
        )
        options = t.data.Options()
        options.deterministic = True
        options.threading.max_intra_op_parallelism = 1
        # No autotuning: its optimiser thread makes tearing an iterator down take seconds (tests,
        # restores, shutdown); parallelism is num_parallel_calls (default: one call per CPU core).
        options.autotune.enabled = False
        return batches.with_options(options)

    def _log_skip(self, reason: np.ndarray, path: bytes, index: np.ndarray, offset: np.ndarray,
                  detail: bytes) -> np.ndarray:
        name, file = SKIP_REASONS[int(reason) - 1], path.decode("utf-8", "replace")
        explained = f" ({detail.decode('utf-8', 'replace')})" if detail else ""
        self._skips_by_file[file] += 1
        if name in records.DAMAGE_KINDS:
            logging.warning("dataset %r: skipping damaged data at byte %d of %s: %s%s", self.name, int(offset),
                            file, name, explained)
        else:
            logging.warning("dataset %r: skipping record %d of %s: %s%s", self.name, int(index), file, name,
                            explained)
        return np.asarray(reason, np.int32)


def assemble_example(tokens, targets, loss_mask, media_index, media, reason, detail, length: int) -> dict[str, Any]:
    """One record's batch fields (graph mode), with its reason and detail for the skip log."""
    t = tf()
    return {
        "tokens": t.ensure_shape(tokens, [length]),
        "targets": t.ensure_shape(targets, [length]),
        "loss_mask": t.ensure_shape(loss_mask, [length]),
        "media_index": t.ensure_shape(media_index, [length]),
        "media": media,
        "reason": t.reshape(reason, []),
        "detail": t.reshape(detail, []),
    }


def _sentinel_like(spec: dict[str, Any]) -> dict[str, Any]:
    """An element shaped like `spec` whose reason is the end-of-stream sentinel."""
    t = tf()
    element = {}
    for key, s in spec.items():
        if s.dtype == t.string:
            element[key] = t.fill(s.shape, "")
        else:
            element[key] = t.zeros(s.shape, s.dtype)
    element["_reason"] = t.constant(_SENTINEL, t.int32)
    return element


def _file_size(path: str) -> int:
    """Bytes in `path`; 0 for a file that cannot be stat'ed (the reader reports it as unreadable)."""
    try:
        return tf().io.gfile.stat(path).length
    except (tf().errors.OpError, OSError):
        return 0


def text_reason(texts: Sequence[Any], num_images: int, max_images: int | None) -> tuple[int, str]:
    """Shared validation: (reason code, detail) for a record's text and image count."""
    if num_images == 0:
        return REASON_CODE["no_image"], "the record has no image"
    if max_images is not None and num_images > max_images:
        return REASON_CODE["too_many_images"], f"{num_images} images > max_images_per_doc={max_images}"
    if not any(len(text) for text in texts):
        return REASON_CODE["empty_text"], "no text"
    return 0, ""
