"""A node-local, verified copy of a dataset directory that lives in object storage.

Training memory-maps shards, which needs files on a local disk, and a multi-node job has no
shared filesystem to put them on. One process per node calls `cache_dataset`; the node's other
ranks wait for it, so nothing is downloaded twice on a node.

    CACHE/<16 hex digits of sha256(uri)>/    the dataset directory, as prepare_dataset wrote it

- A shard is streamed to `NAME.part` while it is hashed, and renamed to its final name only when
  its size and sha256 match dataset.json, so an interrupted download is never taken for a
  complete shard. A restart keeps every shard already under its final name (verified before
  the rename) and downloads the rest again.
- dataset.json is written last: until every file it names is in place, the cache is not a
  dataset that ShardDataset opens. When the remote dataset.json is byte-identical to the cached
  one, nothing but dataset.json itself is read from the remote.
- Files the remote dataset no longer names (a rerun of prepare_dataset replaced its length
  index) are removed from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from preprocess import storage
from preprocess.shard_format import (
    DATASET_JSON,
    SHARD_DIR,
    check_format_version,
    remove_unreferenced,
)

CHUNK_BYTES = 8 * 2**20


class CacheIntegrityError(ValueError):
    """A downloaded file does not match dataset.json; one line naming it."""


@dataclass
class CacheResult:
    """Where the local copy is and what this call had to fetch for it."""

    path: str
    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    kept: int = 0


def cache_path(uri: str, cache_dir: str) -> str:
    """The local directory that holds `uri`'s copy (one per dataset URI)."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), key)


def _download(uri: str, target: str, expected_bytes: int | None, sha256: str | None) -> int:
    filesystem, path = storage.resolve(uri)
    partial = f"{target}.part"
    digest = hashlib.sha256()
    size = 0
    with filesystem.open_input_stream(path) as source, open(partial, "wb") as sink:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            sink.write(chunk)
            size += len(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    if expected_bytes is not None and size != expected_bytes:
        os.remove(partial)
        raise CacheIntegrityError(f"{uri}: expected {expected_bytes} bytes, downloaded {size}")
    if sha256 is not None and digest.hexdigest() != sha256:
        os.remove(partial)
        raise CacheIntegrityError(f"{uri}: sha256 differs from dataset.json")
    os.replace(partial, target)
    return size


def cache_dataset(uri: str, cache_dir: str) -> CacheResult:
    """Brings the node-local copy of the dataset at `uri` up to date; returns where it is."""
    remote_json = storage.read_bytes(storage.join(uri, DATASET_JSON))
    metadata = json.loads(remote_json)
    check_format_version(metadata, storage.join(uri, DATASET_JSON))
    local = cache_path(uri, cache_dir)
    result = CacheResult(path=local)
    local_json = os.path.join(local, DATASET_JSON)
    if os.path.isfile(local_json):
        with open(local_json, "rb") as file:
            if file.read() == remote_json:
                result.kept = len(metadata["shards"])
                return result
    os.makedirs(os.path.join(local, SHARD_DIR), exist_ok=True)

    shards = [(s["name"], s.get("bytes"), s.get("sha256")) for s in metadata["shards"]]
    # No checksums are recorded for the small files. The length index is named per run, so one
    # already here is the same file; vocab.json and the rejects are rewritten by every run.
    rewritten = sorted({metadata["vocab"], metadata["rejects"]})
    small = [(name, None, None) for name in [metadata["length_index"], *rewritten]]
    for name, expected_bytes, sha256 in shards + small:
        target = os.path.join(local, name)
        if (
            name not in rewritten
            and os.path.isfile(target)
            and expected_bytes in (None, os.path.getsize(target))
        ):
            result.kept += 1
            continue
        result.downloaded_bytes += _download(
            storage.join(uri, name), target, expected_bytes, sha256
        )
        result.downloaded.append(name)
    storage.write_bytes_atomically(local_json, remote_json)
    remove_unreferenced(local, metadata)
    return result
