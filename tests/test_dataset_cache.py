"""Node-local caches of a dataset in S3 (moto in server mode on loopback), prepared for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocess.dataset_cache import (
    CacheDownloadError,
    CacheIntegrityError,
    cache_dataset,
    cache_path,
)
from preprocess.shard_format import DATASET_JSON, ShardDataset, ShardIntegrityError


def upload(directory: Path, bucket: str) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for path in directory.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"ds/{path.relative_to(directory)}")
    return f"s3://{bucket}/ds"


def shard_names(directory: Path) -> list[str]:
    return [shard["name"] for shard in json.loads((directory / DATASET_JSON).read_text())["shards"]]


def listed_files(directory: Path) -> list[str]:
    """Every file dataset.json names: what one complete copy downloads."""
    metadata = json.loads((directory / DATASET_JSON).read_text())
    small = {metadata["length_index"], metadata["vocab"], metadata["rejects"]}
    return shard_names(directory) + sorted(small)


def assert_same_rows(cached: str, original: Path) -> None:
    cached_set, original_set = ShardDataset(cached), ShardDataset(str(original))
    assert len(cached_set) == len(original_set)
    for index in range(len(original_set)):
        assert cached_set[index]["id"] == original_set[index]["id"]
        np.testing.assert_array_equal(cached_set[index]["audio"], original_set[index]["audio"])


def test_cold_then_warm_cache_reads_the_same_dataset(s3_server, sharded_dataset, tmp_path):
    uri = upload(sharded_dataset, "cold-warm")
    names = shard_names(sharded_dataset)
    assert len(names) >= 3

    cold = cache_dataset(uri, str(tmp_path))
    assert cold.path == cache_path(uri, str(tmp_path))
    assert set(names) <= set(cold.downloaded)
    assert_same_rows(cold.path, sharded_dataset)

    warm = cache_dataset(uri, str(tmp_path))
    assert warm.downloaded == [] and warm.downloaded_bytes == 0 and warm.repaired == []
    assert warm.kept == len(listed_files(sharded_dataset))


def test_interrupted_download_is_redone_and_verified_shards_are_kept(
    s3_server, sharded_dataset, tmp_path
):
    uri = upload(sharded_dataset, "interrupted")
    path = Path(cache_dataset(uri, str(tmp_path)).path)
    lost = shard_names(sharded_dataset)[1]
    # A download killed midway: the shard exists only as a partial file, and dataset.json was
    # never written for this state.
    (path / lost).rename(path / f"{lost}.part")
    with open(path / f"{lost}.part", "r+b") as file:
        file.truncate(1000)
    (path / DATASET_JSON).unlink()
    with pytest.raises(FileNotFoundError):
        ShardDataset(str(path))

    again = cache_dataset(uri, str(tmp_path))
    assert lost in again.downloaded
    assert not set(shard_names(sharded_dataset)) - {lost} & set(again.downloaded)
    assert not list(path.rglob("*.part"))
    assert len(ShardDataset(str(path))) == len(ShardDataset(str(sharded_dataset)))


def test_a_corrupted_remote_shard_is_never_cached(s3_server, sharded_dataset, tmp_path):
    import boto3

    uri = upload(sharded_dataset, "corrupted")
    name = shard_names(sharded_dataset)[0]
    data = bytearray((sharded_dataset / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so only the checksum can tell
    boto3.client("s3").put_object(Bucket="corrupted", Key=f"ds/{name}", Body=bytes(data))

    with pytest.raises(CacheIntegrityError, match=f"{name}: xxh3_128 checksum differs"):
        cache_dataset(uri, str(tmp_path))
    path = Path(cache_path(uri, str(tmp_path)))
    assert not (path / name).exists() and not (path / f"{name}.part").exists()
    assert not (path / DATASET_JSON).exists()


@pytest.mark.parametrize(
    ("which", "damage"),
    [("shard", "delete"), ("shard", "truncate"), ("length_index", "truncate"), ("vocab", "delete")],
)
def test_a_damaged_file_in_a_warm_cache_is_fetched_again(
    s3_server, sharded_dataset, tmp_path, which, damage
):
    uri = upload(sharded_dataset, f"repair-{which}-{damage}".replace("_", "-"))
    path = Path(cache_dataset(uri, str(tmp_path)).path)
    metadata = json.loads((sharded_dataset / DATASET_JSON).read_text())
    name = shard_names(sharded_dataset)[1] if which == "shard" else metadata[which]
    if damage == "delete":
        (path / name).unlink()
    else:
        os.truncate(path / name, (path / name).stat().st_size // 2)
    # As every later training run on this node would, until the cache is repaired.
    with pytest.raises(ShardIntegrityError if which == "shard" else (ValueError, OSError)):
        ShardDataset(str(path))
    # What a cacher killed midway leaves behind.
    leftover = path / f"{name}.part-4242-0badc0de"
    leftover.write_bytes(b"partial")

    result = cache_dataset(uri, str(tmp_path))
    assert result.repaired == result.downloaded == [name]
    assert result.downloaded_bytes == (sharded_dataset / name).stat().st_size
    assert result.kept == len(listed_files(sharded_dataset)) - 1
    assert not leftover.exists()
    assert_same_rows(str(path), sharded_dataset)


# Reports when it starts and ends, so the test can tell that the two calls overlapped.
CACHER = """
import json, sys, time
import preprocess.dataset_cache as dataset_cache
dataset_cache.CHUNK_BYTES = 2**16  # many small reads: a download that lasts
print("ready", flush=True)
sys.stdin.readline()
start = time.time()
result = dataset_cache.cache_dataset(sys.argv[1], sys.argv[2])
print(json.dumps({"start": start, "end": time.time(), "downloaded": result.downloaded,
                  "bytes": result.downloaded_bytes}))
"""


def cache_concurrently(uri: str, cache_dir: Path, processes: int) -> list[dict]:
    """Calls cache_dataset in separate OS processes, released together once all are ready."""
    cachers = [
        subprocess.Popen(
            [sys.executable, "-c", CACHER, uri, str(cache_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for cacher in cachers:
        assert cacher.stdout.readline() == "ready\n", cacher.communicate()[1]
    for cacher in cachers:
        cacher.stdin.write("go\n")
        cacher.stdin.flush()
    reports = []
    for cacher in cachers:
        stdout, stderr = cacher.communicate(timeout=120)
        assert cacher.returncode == 0, stderr
        reports.append(json.loads(stdout))
    return reports


def test_concurrent_cachers_of_one_dataset_download_it_once(s3_server, sharded_dataset, tmp_path):
    uri = upload(sharded_dataset, "concurrent")
    files = listed_files(sharded_dataset)
    one_copy = sum((sharded_dataset / name).stat().st_size for name in files)
    for attempt in range(3):
        cache_dir = tmp_path / str(attempt)
        reports = cache_concurrently(uri, cache_dir, processes=2)
        # Each started before the other finished: the second waited for the first's lock.
        assert max(r["start"] for r in reports) < min(r["end"] for r in reports)
        assert sorted(n for r in reports for n in r["downloaded"]) == sorted(files)
        assert sum(r["bytes"] for r in reports) == one_copy
        assert not [p for p in cache_dir.rglob("*") if ".part" in p.name]
        assert_same_rows(cache_path(uri, str(cache_dir)), sharded_dataset)


def test_a_failed_download_is_one_line_naming_the_file(s3_server, sharded_dataset, tmp_path):
    import boto3

    uri = upload(sharded_dataset, "failing")
    name = shard_names(sharded_dataset)[1]
    # dataset.json still lists it: an object lost in the bucket after the dataset was written.
    boto3.client("s3").delete_object(Bucket="failing", Key=f"ds/{name}")

    with pytest.raises(CacheDownloadError) as caught:
        cache_dataset(uri, str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{uri}/{name}: download failed: ") and "\n" not in message
    path = Path(cache_path(uri, str(tmp_path)))
    assert not [p for p in path.rglob("*") if ".part" in p.name]
    assert not (path / DATASET_JSON).exists()
