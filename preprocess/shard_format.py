"""The dataset directory: the one contract between preprocessing and training.

Writer and reader live side by side here so the format has exactly one home. The format, with
a real dataset.json: docs/dataset_format.md.

    OUT/dataset.json                  commit point: options, counts, shard list with checksums
    OUT/vocab.json                    characters of the transcripts, Wav2Vec2CTCTokenizer format
    OUT/shards/shard-<run>-<task>-<part>.arrow
                                      Arrow IPC files, uncompressed, so they memory-map
    OUT/length_index.<run>.arrow      id, shard, row, num_samples, text_length, audio_mean,
                                      audio_std: batch planning and normalization without
                                      touching audio
    OUT/rejects.<run>.jsonl           every input row that did not make it, with a reason
    OUT/_staging/<run>/               shards being written; never part of the dataset

Nothing is part of the dataset until dataset.json names it, and dataset.json is replaced
atomically as the last step of a run, so a killed run leaves at most unreferenced files, which
the next run removes. dataset.json records each shard's size and xxh3-128 checksum: opening a
dataset checks sizes and Arrow footers (O(shards), no audio read); preprocess/verify_dataset.py
checks the rest.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import xxhash

from preprocess import storage

# 2: per-utterance audio_mean and audio_std (float64, over the resampled samples) in the shards
# and the length index, so the loader normalizes in one pass without reading the audio twice.
# 3: shard checksums are xxh3-128, not sha256: they detect damage (transport has its own
# integrity), and sha256 cost writers about 5 % of decoding time where xxh3 costs 0.5 %.
FORMAT_VERSION = 3
CHECKSUM = "xxh3_128"  # dataset.json's "checksum"; each shard's hex digest is under this key
DATASET_JSON = "dataset.json"
VOCAB_JSON = "vocab.json"
SHARD_DIR = "shards"
STAGING_DIR = "_staging"

# An Arrow IPC file starts with the magic and ends with its footer, the footer's length as a
# little-endian int32, and the magic again.
ARROW_MAGIC = b"ARROW1"
HEADER_BYTES = 8  # the magic padded to 8 bytes
TRAILER_BYTES = 4 + len(ARROW_MAGIC)

AUDIO_TYPE = pa.large_list(pa.float32())
LENGTH_INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("num_samples", pa.int64()),
        ("text_length", pa.int32()),
        ("audio_mean", pa.float64()),
        ("audio_std", pa.float64()),
    ]
)


def shard_schema(passthrough_columns: list[str]) -> pa.Schema:
    """Plain Arrow types only, so any Arrow reader opens the shards without Ray installed."""
    fields = [
        ("id", pa.string()),
        ("audio", AUDIO_TYPE),
        ("num_samples", pa.int64()),
        ("audio_mean", pa.float64()),
        ("audio_std", pa.float64()),
        ("text", pa.string()),
        ("sentence", pa.string()),
    ]
    return pa.schema(fields + [(name, pa.string()) for name in passthrough_columns])


@dataclass
class ShardInfo:
    """A finished shard file and its share of the length index."""

    name: str
    rows: int
    bytes: int
    checksum: str  # hex digest of the CHECKSUM algorithm
    ids: list[str] = field(default_factory=list)
    num_samples: list[int] = field(default_factory=list)
    text_lengths: list[int] = field(default_factory=list)
    audio_means: list[float] = field(default_factory=list)
    audio_stds: list[float] = field(default_factory=list)


def audio_statistics(samples: np.ndarray) -> tuple[float, float] | None:
    """Mean and standard deviation of float32 audio, or None if a sample is NaN or Inf.

    The mean is a float32 pairwise sum (error near 1e-7 of the signal's scale, far below what
    normalization can notice); the std sums centred squares, so a DC offset does not cancel it
    away. A NaN or Inf sample makes both sums non-finite, which spares a finiteness pass.
    """
    count = samples.size
    with np.errstate(over="ignore", invalid="ignore"):  # bad audio is a reject, not a warning
        mean = float(np.add.reduce(samples, dtype=np.float32)) / count
        centred = samples - np.float32(mean)
        squares = float(np.dot(centred, centred))
    if math.isfinite(squares):
        return mean, math.sqrt(squares / count)
    if not np.isfinite(samples).all():
        return None
    wide = samples.astype(np.float64)  # finite samples whose squares overflow float32
    return float(wide.mean()), float(wide.std())


def new_checksum() -> xxhash.xxh3_128:
    """The running checksum dataset.json records for every shard (`hexdigest()` when done)."""
    return xxhash.xxh3_128()


class _HashingSink:
    """File-like wrapper so the checksum is computed while writing, not by reading back."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.digest = new_checksum()
        self.position = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self._stream.write(view)
        self.position += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()
        self.closed = True


# A record batch's audio stays about this size (one longer clip is a batch of its own): small
# enough that a clip is still in the core's cache when its batch is written. Decode and write
# of 1 h of the benchmark's clips, CPU-s per audio hour, medians of 6 (AMD EPYC): 2.94 with
# 1 MiB batches, 3.08 (+5 %) with 64 MiB ones.
MAX_BATCH_BYTES = 2**20


class ShardWriter:
    """Writes decoded utterances into staged shard files of bounded size (one writer per task).

    Each utterance is copied into a reused batch buffer; every `rows_per_batch` rows (fewer
    where their audio would pass `max_batch_bytes`) become one record batch whose audio is a
    view of that buffer, so the samples are copied once between the decoder and the file, and
    checksummed as they are written, never read back.
    """

    def __init__(
        self,
        staging_uri: str,
        name_prefix: str,
        schema: pa.Schema,
        max_shard_bytes: int,
        rows_per_batch: int = 32,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self._filesystem, self._staging_path = storage.resolve(staging_uri)
        self._filesystem.create_dir(self._staging_path, recursive=True)
        self._prefix = name_prefix
        self._schema = schema
        self._max_bytes = max_shard_bytes
        self._rows_per_batch = rows_per_batch
        self._text_columns = [n for n in schema.names if schema.field(n).type == pa.string()]
        self._samples = np.empty(0, np.float32)
        self._max_batch_samples = max_batch_bytes // self._samples.itemsize
        self._used = 0
        self._pending: list[dict[str, Any]] = []
        self._sink: _HashingSink | None = None
        self._writer: ipc.RecordBatchFileWriter | None = None
        self._current: ShardInfo | None = None
        self.finished: list[ShardInfo] = []

    def add(self, row: dict[str, Any], samples: np.ndarray, mean: float, std: float) -> None:
        """One utterance: `row` holds (at least) the schema's string columns, `samples` its
        non-empty float32 audio, `mean` and `std` its statistics (audio_statistics)."""
        count = samples.size
        if self._pending and self._used + count > self._max_batch_samples:
            self._write_pending()
        if self._used + count > self._samples.size:
            # Grown, not flushed: a buffer sized by the first clip would make one-row batches,
            # a file write (and footer entry) per utterance.
            grown = np.empty(max(self._used + count, 2 * self._samples.size), np.float32)
            grown[: self._used] = self._samples[: self._used]
            self._samples = grown
        self._samples[self._used : self._used + count] = samples
        self._used += count
        strings = {name: row[name] for name in self._text_columns}
        self._pending.append(
            {**strings, "num_samples": count, "audio_mean": mean, "audio_std": std}
        )
        if len(self._pending) >= self._rows_per_batch:
            self._write_pending()

    def close(self) -> list[ShardInfo]:
        self._write_pending()
        self._close()
        return self.finished

    def _write_pending(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        lengths = np.fromiter((r["num_samples"] for r in rows), np.int64, len(rows))
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        columns = {n: pa.array([r[n] for r in rows], pa.string()) for n in self._text_columns}
        columns["audio"] = pa.LargeListArray.from_arrays(
            pa.array(offsets),
            pa.array(self._samples[: self._used]),  # a view, not a copy
        )
        for name in ("num_samples", "audio_mean", "audio_std"):
            columns[name] = pa.array([r[name] for r in rows], self._schema.field(name).type)
        batch = pa.RecordBatch.from_pydict(columns, schema=self._schema)
        if self._writer is None:
            self._open()
        assert self._current is not None and self._writer is not None
        # Written (and hashed) synchronously, so the buffer is free for the next batch after.
        self._writer.write_batch(batch)
        self._used = 0
        self._current.rows += len(rows)
        self._current.ids.extend(r["id"] for r in rows)
        self._current.num_samples.extend(lengths.tolist())
        self._current.text_lengths.extend(len(r["text"]) for r in rows)
        self._current.audio_means.extend(r["audio_mean"] for r in rows)
        self._current.audio_stds.extend(r["audio_std"] for r in rows)
        if self._sink is not None and self._sink.position >= self._max_bytes:
            self._close()

    def _open(self) -> None:
        name = f"{self._prefix}-{len(self.finished):03d}.arrow"
        stream = self._filesystem.open_output_stream(posixpath.join(self._staging_path, name))
        self._sink = _HashingSink(stream)
        # Uncompressed on purpose: compressed buffers cannot be memory-mapped as views.
        self._writer = ipc.new_file(self._sink, self._schema)
        self._current = ShardInfo(name=name, rows=0, bytes=0, checksum="")

    def _close(self) -> None:
        if self._writer is None:
            return
        assert self._sink is not None and self._current is not None
        self._writer.close()
        self._sink.close()
        self._current.bytes = self._sink.position
        self._current.checksum = self._sink.digest.hexdigest()
        self.finished.append(self._current)
        self._writer = self._sink = self._current = None


@dataclass
class RunRecord:
    """What one preprocessing run added; dataset.json keeps the history."""

    run_id: str
    manifest: str
    accepted: int
    rejected: int
    skipped_already_processed: int
    input_seconds: float
    wall_seconds: float


def check_format_version(metadata: dict[str, Any], uri: str) -> None:
    """Stops with one line when dataset.json was written by another format version."""
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{uri} has format version {metadata.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}: re-run python -m preprocess.prepare_dataset into a new output_dir"
        )


def read_dataset_json(output_dir: str) -> dict[str, Any] | None:
    uri = storage.join(output_dir, DATASET_JSON)
    if not storage.exists(uri):
        return None
    metadata = json.loads(storage.read_bytes(uri))
    check_format_version(metadata, uri)
    return metadata


def read_length_index(output_dir: str, metadata: dict[str, Any]) -> pa.Table:
    uri = storage.join(output_dir, metadata["length_index"])
    return ipc.open_file(pa.BufferReader(storage.read_bytes(uri))).read_all()


def read_rejects(output_dir: str, metadata: dict[str, Any]) -> list[dict[str, Any]]:
    uri = storage.join(output_dir, metadata["rejects"])
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]


def commit_run(
    output_dir: str,
    previous: dict[str, Any] | None,
    staged_shards: list[ShardInfo],
    rejects: list[dict[str, Any]],
    vocab: dict[str, int],
    options: dict[str, Any],
    run: RunRecord,
) -> dict[str, Any]:
    """Make a run's shards part of the dataset; dataset.json is written last, atomically."""
    filesystem, root = storage.resolve(output_dir)
    filesystem.create_dir(posixpath.join(root, SHARD_DIR), recursive=True)
    staging = posixpath.join(root, STAGING_DIR, run.run_id)
    for shard in staged_shards:
        filesystem.move(
            posixpath.join(staging, shard.name), posixpath.join(root, SHARD_DIR, shard.name)
        )

    old_index = read_length_index(output_dir, previous) if previous else None
    new_index = pa.table(
        {
            "id": [i for s in staged_shards for i in s.ids],
            "shard": [f"{SHARD_DIR}/{s.name}" for s in staged_shards for _ in range(s.rows)],
            "row": [r for s in staged_shards for r in range(s.rows)],
            "num_samples": [n for s in staged_shards for n in s.num_samples],
            "text_length": [n for s in staged_shards for n in s.text_lengths],
            "audio_mean": [m for s in staged_shards for m in s.audio_means],
            "audio_std": [d for s in staged_shards for d in s.audio_stds],
        },
        schema=LENGTH_INDEX_SCHEMA,
    )
    length_index = pa.concat_tables([old_index, new_index]) if old_index else new_index
    length_index_name = f"length_index.{run.run_id}.arrow"
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, LENGTH_INDEX_SCHEMA) as writer:
        writer.write_table(length_index)
    storage.write_bytes_atomically(
        storage.join(output_dir, length_index_name), sink.getvalue().to_pybytes()
    )

    all_rejects = (read_rejects(output_dir, previous) if previous else []) + rejects
    rejects_name = f"rejects.{run.run_id}.jsonl"
    storage.write_bytes_atomically(
        storage.join(output_dir, rejects_name),
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rejects).encode(),
    )
    storage.write_bytes_atomically(
        storage.join(output_dir, VOCAB_JSON),
        json.dumps(vocab, ensure_ascii=False, indent=1).encode(),
    )

    sampling_rate = options["sampling_rate"]
    shards = (previous["shards"] if previous else []) + [
        {"name": f"{SHARD_DIR}/{s.name}", "rows": s.rows, "bytes": s.bytes, CHECKSUM: s.checksum}
        for s in staged_shards
    ]
    by_reason = dict(Counter(reject["reason"] for reject in all_rejects))
    total_samples = int(np.sum(length_index.column("num_samples").to_numpy()))
    metadata = {
        "format_version": FORMAT_VERSION,
        "checksum": CHECKSUM,
        "sampling_rate": sampling_rate,
        "counts": {
            "input_rows": length_index.num_rows + len(all_rejects),
            "accepted": length_index.num_rows,
            "rejected": len(all_rejects),
            "rejected_by_reason": by_reason,
        },
        "total_hours": total_samples / sampling_rate / 3600,
        "shards": shards,
        "length_index": length_index_name,
        "rejects": rejects_name,
        "vocab": VOCAB_JSON,
        "options": options,
        "runs": (previous["runs"] if previous else []) + [asdict(run)],
    }
    storage.write_bytes_atomically(
        storage.join(output_dir, DATASET_JSON), json.dumps(metadata, indent=1).encode()
    )
    remove_unreferenced(output_dir, metadata)
    return metadata


class ShardIntegrityError(ValueError):
    """A shard dataset.json lists is missing or damaged; one line naming the shard."""


def shard_problem(filesystem: pafs.FileSystem, path: str, shard: dict[str, Any]) -> str | None:
    """What is wrong with a listed shard, judged from its size and Arrow magic and footer alone.

    Reads 16 bytes of the file whatever its size, so checking every shard on open stays cheap.
    Datasets written before sizes were recorded have no "bytes"; their footers are still checked.
    """
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        return "missing: dataset.json lists it but the file is not there"
    expected = shard.get("bytes")
    if expected is not None and info.size != expected:
        kind = "truncated" if info.size < expected else "wrong size"
        return f"{kind}: expected {expected} bytes, found {info.size}"
    if info.size < HEADER_BYTES + TRAILER_BYTES:
        return f"not an Arrow file: {info.size} bytes"
    with filesystem.open_input_file(path) as file:
        head = file.read_at(len(ARROW_MAGIC), 0)
        trailer = file.read_at(TRAILER_BYTES, info.size - TRAILER_BYTES)
    footer_bytes = int.from_bytes(trailer[:4], "little", signed=True)
    if head != ARROW_MAGIC or trailer[4:] != ARROW_MAGIC:
        return "not an Arrow file: no ARROW1 magic at both ends"
    if not 0 < footer_bytes <= info.size - HEADER_BYTES - TRAILER_BYTES:
        return f"not an Arrow file: footer length {footer_bytes} in a {info.size}-byte file"
    return None


def remove_unreferenced(output_dir: str, metadata: dict[str, Any] | None) -> list[str]:
    """Delete leftovers of killed runs: staged shards and files dataset.json does not name."""
    filesystem, root = storage.resolve(output_dir)
    referenced = set()
    if metadata:
        referenced = {s["name"] for s in metadata["shards"]}
        referenced |= {metadata["length_index"], metadata["rejects"]}
    removed = []
    if filesystem.get_file_info(posixpath.join(root, STAGING_DIR)).type == pafs.FileType.Directory:
        filesystem.delete_dir(posixpath.join(root, STAGING_DIR))
        removed.append(STAGING_DIR)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        relative = posixpath.relpath(info.path, root)
        generated = relative.startswith(f"{SHARD_DIR}/") or relative.startswith(
            ("length_index.", "rejects.")
        )
        if info.type == pafs.FileType.File and generated and relative not in referenced:
            filesystem.delete_file(info.path)
            removed.append(relative)
    return removed


def _numpy_view(column: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    """A null-free primitive column as NumPy, without pyarrow's to_numpy.

    to_numpy imports pandas on first use (a quarter of a second, before the first step).
    """
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = np.dtype(dtype).itemsize
    if array.null_count or array.type.bit_width != 8 * width:
        raise ValueError(f"column of type {array.type} is not {np.dtype(dtype)}")
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * width)


class ShardDataset:
    """Random access to a prepared dataset directory through memory maps: what training reads.

    Opening reads dataset.json, vocab.json and the length index, never audio, and checks every
    shard's size and footer, so a damaged shard stops training before its first step rather than
    in a DataLoader worker hours later. Shards are mapped on first access, per process.

    >>> dataset = ShardDataset("data/train")
    >>> item = dataset[0]  # id, text, sentence, audio (read-only float32 view), audio_mean/std
    >>> dataset.audio_lengths[:3]  # samples per utterance, from the length index
    array([26725, 43738, 58298])

    Args:
        path: the dataset directory, local or mounted (object storage: see dataset_cache).

    Raises:
        FileNotFoundError: `path` has no dataset.json.
        ValueError: `path` is remote, or its format version is not this code's.
        ShardIntegrityError: a listed shard is missing, truncated or not an Arrow file.
    """

    def __init__(self, path: str) -> None:
        if storage.is_remote(path):
            raise ValueError(
                f"{path}: training reads shards through memory maps, which need a local or "
                "mounted filesystem; train with --cache_dir, or copy the dataset to local disk"
            )
        self.path = os.path.abspath(path)
        metadata = read_dataset_json(self.path)
        if metadata is None:
            raise FileNotFoundError(f"no {DATASET_JSON} in {self.path}: not a prepared dataset")
        self.metadata = metadata
        filesystem = pafs.LocalFileSystem()
        for shard in metadata["shards"]:
            path = os.path.join(self.path, shard["name"])
            problem = shard_problem(filesystem, path, shard)
            if problem is not None:
                raise ShardIntegrityError(f"shard {path}: {problem}")
        self.sampling_rate: int = metadata["sampling_rate"]
        with open(os.path.join(self.path, metadata["vocab"]), encoding="utf-8") as file:
            self.vocab: dict[str, int] = json.load(file)
        with pa.memory_map(os.path.join(self.path, metadata["length_index"])) as source:
            self.length_index = ipc.open_file(source).read_all()
        shard_codes = self.length_index.column("shard").combine_chunks().dictionary_encode()
        self._shard_names: list[str] = shard_codes.dictionary.to_pylist()
        self._shard_of_row = _numpy_view(shard_codes.indices, np.int32)
        column = self.length_index.column
        self._row_in_shard = _numpy_view(column("row"), np.int64)
        self.audio_lengths: np.ndarray = _numpy_view(column("num_samples"), np.int64)
        self.text_lengths: np.ndarray = _numpy_view(column("text_length"), np.int32)
        self.audio_mean: np.ndarray = _numpy_view(column("audio_mean"), np.float64)
        self.audio_std: np.ndarray = _numpy_view(column("audio_std"), np.float64)
        self._open_shards: dict[int, _MappedShard] = {}

    def __len__(self) -> int:
        return self.length_index.num_rows

    @property
    def total_hours(self) -> float:
        return float(self.audio_lengths.sum()) / self.sampling_rate / 3600

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch of rows at once (torch's DataLoader calls this for a whole batch)."""
        items = []
        for code, row, mean, std in zip(
            self._shard_of_row[indices].tolist(),
            self._row_in_shard[indices].tolist(),
            self.audio_mean[indices].tolist(),
            self.audio_std[indices].tolist(),
            strict=True,
        ):
            shard = self._open_shards.get(code)
            if shard is None:
                shard = _MappedShard(os.path.join(self.path, self._shard_names[code]))
                self._open_shards[code] = shard
            item = shard.row(row)
            item["audio_mean"], item["audio_std"] = mean, std
            items.append(item)
        return items

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def __getstate__(self) -> dict[str, Any]:
        # Maps are per process: a DataLoader worker re-maps what it reads.
        return {**self.__dict__, "_open_shards": {}}


class _MappedShard:
    """One memory-mapped shard file, resolved once into per-row Python lookups.

    Reading a row then costs list indexing and one NumPy slice: the loader reads every row of
    every epoch, and Arrow scalar conversions per row would cost more than copying its audio.
    """

    def __init__(self, path: str) -> None:
        self._source = pa.memory_map(path)
        reader = ipc.open_file(self._source)
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self._values = [_numpy_view(b.column("audio").values, np.float32) for b in batches]
        self._batch: list[int] = []
        self._begin: list[int] = []
        self._end: list[int] = []
        for number, batch in enumerate(batches):
            offsets = _numpy_view(batch.column("audio").offsets, np.int64).tolist()
            self._batch += [number] * batch.num_rows
            self._begin += offsets[:-1]
            self._end += offsets[1:]
        self._ids = [i for b in batches for i in b.column("id").to_pylist()]
        self._texts = [t for b in batches for t in b.column("text").to_pylist()]
        self._sentences = [t for b in batches for t in b.column("sentence").to_pylist()]

    def row(self, row: int) -> dict[str, Any]:
        return {
            "id": self._ids[row],
            "audio": self._values[self._batch[row]][self._begin[row] : self._end[row]],
            "text": self._texts[row],
            "sentence": self._sentences[row],
        }
