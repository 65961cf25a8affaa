"""Local paths and s3:// URIs behind one small interface (pyarrow.fs).

S3 endpoints and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), so a MinIO or moto server works like AWS.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from functools import lru_cache

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


@lru_cache(maxsize=64)
def _filesystem_for(scheme_and_bucket: str) -> pafs.FileSystem:
    # Building an S3FileSystem resolves credentials and region: do it once per bucket, not per file.
    filesystem, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
    return filesystem


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path inside it."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    return _filesystem_for(f"{scheme}://{bucket}"), rest.rstrip("/")


def joiner(root: str) -> Callable[[str], str]:
    """`join` with `root` fixed, for a manifest's whole audio column: what depends on the root
    is worked out once, not per row, where it cost a fifth of reading an 840k-row manifest.
    Paths are POSIX paths here, as everywhere Ray and DeepSpeed run."""
    prefix = root if not root or root.endswith("/") else root + "/"

    def join_to_root(relative: str) -> str:
        if is_remote(relative) or relative.startswith("/"):
            return relative
        return prefix + relative

    return join_to_root


def join(root: str, relative: str) -> str:
    """`relative` under `root`, unless it is already absolute or a URI."""
    return joiner(root)(relative)


def parent(uri: str) -> str:
    return (
        posixpath.dirname(uri.rstrip("/"))
        if is_remote(uri)
        else os.path.dirname(os.path.abspath(uri))
    )


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        with open(uri, "rb") as file:
            return file.read()
    filesystem, path = resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomically(uri: str, data: bytes) -> None:
    """Readers see the old content or the new, never a prefix.

    Locally: write a temporary sibling, fsync, rename. On S3 a single PUT is already atomic.
    """
    filesystem, path = resolve(uri)
    if is_remote(uri):
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)
        return
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound
