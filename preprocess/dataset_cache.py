"""A node-local, verified copy of a dataset directory that lives in object storage, because
training memory-maps shards, which needs local files, and a multi-node job has no shared disk.

One process per node calls `cache_dataset`; the node's other ranks wait for it, so nothing is
downloaded twice on a node.

    CACHE/<16 hex digits of sha256(uri)>/       the dataset directory, as prepare_dataset wrote it
    CACHE/<16 hex digits of sha256(uri)>.lock   held (flock) by whoever is updating that copy

What the cache guarantees (verified files, self-repair, a lock per dataset, one-line errors):
docs/node_cache.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from preprocess import storage
from preprocess.shard_format import (
    CHECKSUM,
    DATASET_JSON,
    SHARD_DIR,
    check_format_version,
    new_checksum,
    remove_unreferenced,
    shard_problem,
)

CHUNK_BYTES = 8 * 2**20

# `NAME.part` (before per-process names), `NAME.part-<pid>-<random>` from _download, and
# `NAME.tmp-<pid>` from storage.write_bytes_atomically.
_TEMPORARY = re.compile(r"\.(part|tmp)(-[^/]*)?$")


class DatasetCacheError(ValueError):
    """A file of the dataset could not be cached; its message is one line starting with the
    file's URI, fit to print as a job's only error.

    >>> try:
    ...     cache_dataset("s3://bucket/prepared/train", "/local/nvme/cache")
    ... except DatasetCacheError as error:
    ...     sys.exit(f"error: {socket.gethostname()}: {error}")
    """


class CacheIntegrityError(DatasetCacheError):
    """A downloaded file does not match dataset.json."""


class CacheDownloadError(DatasetCacheError):
    """Reading a file from the remote (or writing its copy) failed."""


@dataclass
class CacheResult:
    """What `cache_dataset` returns: where the local copy is and what this call had to fetch,
    so a job can log how much a node downloaded and notice a disk that loses files.

    >>> result = cache_dataset("s3://bucket/prepared/train", "/local/nvme/cache")
    >>> print(f"downloaded {len(result.downloaded)} files, kept {result.kept}")

    Args:
        path: The local dataset directory, to open with ShardDataset.
        downloaded: Files fetched by this call, relative to `path`.
        downloaded_bytes: Their total size.
        kept: Files already cached intact, not fetched.
        repaired: The files in `downloaded` that the cache should already have held intact
            (its dataset.json listed them) but that were missing or damaged: a sign of a
            sick disk or a cleaner.
    """

    path: str
    downloaded: list[str] = field(default_factory=list)
    downloaded_bytes: int = 0
    kept: int = 0
    repaired: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Listed:
    """One file dataset.json names, with what the cached copy is checked against."""

    name: str
    expected_bytes: int | None = None
    checksum: str | None = None  # xxh3-128 hex digest, as dataset.json records it
    arrow: bool = False  # has an Arrow footer worth checking
    rewritten: bool = False  # rewritten by every prepare_dataset run under the same name


def cache_path(uri: str, cache_dir: str) -> str:
    """The local directory that holds `uri`'s copy, one per dataset URI, so ranks that did not
    call `cache_dataset` know where to open it.

    >>> ShardDataset(cache_path("s3://bucket/prepared/train", "/local/nvme/cache"))

    Args:
        uri: The dataset's URI; a trailing slash makes no difference.
        cache_dir: The node-local cache directory.
    """
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(cache_dir), key)


def cache_dataset(uri: str, cache_dir: str) -> CacheResult:
    """Brings the node-local copy of the dataset at `uri` up to date and returns where it is,
    downloading only the files that are missing or damaged, each checked against dataset.json.

    Waits while another process (another job, or a node sharing the cache on NFS) updates the
    same copy. Guarantees: docs/node_cache.md.

    >>> result = cache_dataset("s3://bucket/prepared/train", "/local/nvme/cache")
    >>> train_set = ShardDataset(result.path)

    Args:
        uri: The dataset directory prepare_dataset wrote, e.g. ``s3://bucket/prepared/train``.
        cache_dir: A node-local directory; created if missing.

    Raises:
        DatasetCacheError: A file could not be fetched (`CacheDownloadError`) or does not
            match dataset.json (`CacheIntegrityError`); one line naming the file's URI.
        ValueError: The remote dataset.json is of another format version.
    """
    local = cache_path(uri, cache_dir)
    with _locked(f"{local}.lock"):
        return _update(uri, local)


@contextlib.contextmanager
def _locked(lock_file: str) -> Iterator[None]:
    """Holds an exclusive flock on `lock_file`; the kernel drops it if the holder dies.

    The lock file is never deleted: a waiter would go on holding a lock on the unlinked file
    while a newcomer locks a new one.
    """
    os.makedirs(os.path.dirname(lock_file), exist_ok=True)
    with open(lock_file, "a") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        yield


def _update(uri: str, local: str) -> CacheResult:
    """Checks every file the remote dataset.json names and fetches what is absent or damaged;
    runs under the lock."""
    json_uri = storage.join(uri, DATASET_JSON)
    remote_json = _fetch_small(json_uri)
    metadata = json.loads(remote_json)
    check_format_version(metadata, json_uri)
    local_json = os.path.join(local, DATASET_JSON)
    cached_json = _read_if_present(local_json)
    unchanged = cached_json == remote_json
    promised = _names_listed(cached_json)
    os.makedirs(os.path.join(local, SHARD_DIR), exist_ok=True)
    _remove_temporary_files(local)

    result = CacheResult(path=local)
    for listed in _listed_files(metadata):
        target = os.path.join(local, listed.name)
        # A changed dataset.json may come with new vocab and rejects under the same names.
        refetch = listed.rewritten and not unchanged
        if not refetch and _intact(target, listed):
            result.kept += 1
            continue
        result.downloaded_bytes += _download(
            storage.join(uri, listed.name), target, listed.expected_bytes, listed.checksum
        )
        result.downloaded.append(listed.name)
        if not refetch and listed.name in promised:
            result.repaired.append(listed.name)
    if not unchanged:
        storage.write_bytes_atomically(local_json, remote_json)
    remove_unreferenced(local, metadata)
    return result


def _listed_files(metadata: dict[str, Any]) -> list[_Listed]:
    """Every file dataset.json names: shards with their size and checksum, then the small files.

    No checksums are recorded for the small files. The length index is named per run, so one
    already here is the same file; vocab.json and the rejects are rewritten by every run.
    """
    shards = [
        _Listed(s["name"], s.get("bytes"), s.get(CHECKSUM), arrow=True) for s in metadata["shards"]
    ]
    rewritten = sorted({metadata["vocab"], metadata["rejects"]})
    return [
        *shards,
        _Listed(metadata["length_index"], arrow=True),
        *(_Listed(name, rewritten=True) for name in rewritten),
    ]


def _names_listed(dataset_json: bytes | None) -> set[str]:
    """The files a cached dataset.json lists, which the cache should hold intact.

    An unreadable cached dataset.json promises nothing: it is replaced, not a reason to fail.
    """
    if dataset_json is None:
        return set()
    try:
        metadata = json.loads(dataset_json)
        names = {shard["name"] for shard in metadata["shards"]}
        return names | {metadata[key] for key in ("length_index", "vocab", "rejects")}
    except (ValueError, LookupError, TypeError):
        return set()


def _intact(path: str, listed: _Listed) -> bool:
    """Whether the cached copy passes the cheap checks: size and Arrow footer, no full read."""
    if not listed.arrow:
        return os.path.isfile(path)
    problem = shard_problem(pafs.LocalFileSystem(), path, {"bytes": listed.expected_bytes})
    return problem is None


def _download(uri: str, target: str, expected_bytes: int | None, checksum: str | None) -> int:
    """Streams `uri` to a temporary sibling of `target` while hashing it, and renames it to
    `target` only if its size and checksum match; returns the size."""
    partial = f"{target}.part-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        size, digest = _stream_to_file(uri, partial)
        if expected_bytes is not None and size != expected_bytes:
            raise CacheIntegrityError(f"{uri}: expected {expected_bytes} bytes, downloaded {size}")
        if checksum is not None and digest != checksum:
            raise CacheIntegrityError(f"{uri}: {CHECKSUM} checksum differs from dataset.json")
        os.replace(partial, target)
    finally:
        # Gone already after a successful rename.
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    return size


def _stream_to_file(uri: str, path: str) -> tuple[int, str]:
    """Copies `uri` to the local `path`, synced to disk; returns its size and checksum."""
    filesystem, remote_path = storage.resolve(uri)
    digest = new_checksum()
    size = 0
    try:
        with filesystem.open_input_stream(remote_path) as source, open(path, "wb") as sink:
            while chunk := source.read(CHUNK_BYTES):
                digest.update(chunk)
                sink.write(chunk)
                size += len(chunk)
            sink.flush()
            os.fsync(sink.fileno())
    except OSError as error:  # pyarrow raises S3 and network errors as OSError
        raise CacheDownloadError(f"{uri}: download failed: {_one_line(error)}") from error
    return size, digest.hexdigest()


def _fetch_small(uri: str) -> bytes:
    """The whole of a small remote file, failing like a download does."""
    try:
        return storage.read_bytes(uri)
    except OSError as error:
        raise CacheDownloadError(f"{uri}: download failed: {_one_line(error)}") from error


def _one_line(error: BaseException) -> str:
    # AWS SDK messages can span lines; the caller prefixes one line with the hostname.
    return " ".join(str(error).split())


def _read_if_present(path: str) -> bytes | None:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _remove_temporary_files(local: str) -> None:
    """Deletes temporary files left by killed callers; safe only under the lock."""
    for directory, _, files in os.walk(local):
        for name in files:
            if _TEMPORARY.search(name):
                os.remove(os.path.join(directory, name))
