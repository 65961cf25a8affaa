"""Check every byte of a prepared dataset against dataset.json, e.g. after copying it.

    python -m preprocess.verify_dataset data/de-train
    python -m preprocess.verify_dataset s3://bucket/prepared/train

Opening a dataset (ShardDataset) checks only each shard's size and Arrow footer, so a byte
flipped inside the audio goes unnoticed there; this also streams every shard through its
checksum (xxh3-128, as dataset.json records it).
Prints one line per problem; exits 0 when there are none, 1 otherwise.
"""

from __future__ import annotations

import argparse
import posixpath
import sys

import pyarrow.fs as pafs

from preprocess import shard_format, storage

CHUNK_BYTES = 8 * 1024 * 1024


def file_checksum(filesystem: pafs.FileSystem, path: str) -> str:
    """Hex checksum of a file read in chunks, so memory stays flat whatever the shard size."""
    digest = shard_format.new_checksum()
    with filesystem.open_input_stream(path) as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_problems(dataset_dir: str) -> list[str]:
    """Everything wrong with the dataset directory, one line each, each naming its file."""
    try:
        metadata = shard_format.read_dataset_json(dataset_dir)
    except (OSError, ValueError) as error:  # unreadable, not JSON, or another format version
        return [f"{storage.join(dataset_dir, shard_format.DATASET_JSON)}: {error}"]
    if metadata is None:
        return [f"{storage.join(dataset_dir, shard_format.DATASET_JSON)}: missing"]
    filesystem, root = storage.resolve(dataset_dir)
    problems = [
        f"{storage.join(dataset_dir, metadata[key])}: missing"
        for key in ("length_index", "rejects", "vocab")
        if not storage.exists(storage.join(dataset_dir, metadata[key]))
    ]
    for shard in metadata["shards"]:
        path = posixpath.join(root, shard["name"])
        problem = shard_format.shard_problem(filesystem, path, shard)
        expected = shard.get(shard_format.CHECKSUM)
        if problem is None and expected is not None:
            found = file_checksum(filesystem, path)
            if found != expected:
                problem = (
                    f"checksum mismatch: expected {shard_format.CHECKSUM} {expected}, found {found}"
                )
        if problem is not None:
            problems.append(f"shard {storage.join(dataset_dir, shard['name'])}: {problem}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Verify a prepared dataset: every shard listed in dataset.json is there, "
        "has its recorded size, an Arrow footer and its recorded checksum. Exit 0 when clean."
    )
    parser.add_argument("dataset_dir", help="dataset directory (local path or s3:// URI)")
    dataset_dir = parser.parse_args(argv).dataset_dir
    problems = dataset_problems(dataset_dir)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    print(f"{dataset_dir}: ok, every shard matches dataset.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
