"""Node-local caches of a dataset in S3 (moto in server mode on loopback), prepared for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocess.dataset_cache import CacheIntegrityError, cache_dataset, cache_path
from preprocess.shard_format import DATASET_JSON, ShardDataset


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


def test_cold_then_warm_cache_reads_the_same_dataset(s3_server, sharded_dataset, tmp_path):
    uri = upload(sharded_dataset, "cold-warm")
    names = shard_names(sharded_dataset)
    assert len(names) >= 3

    cold = cache_dataset(uri, str(tmp_path))
    assert cold.path == cache_path(uri, str(tmp_path))
    assert set(names) <= set(cold.downloaded)
    cached, local = ShardDataset(cold.path), ShardDataset(str(sharded_dataset))
    assert len(cached) == len(local)
    for index in range(len(local)):
        assert cached[index]["id"] == local[index]["id"]
        np.testing.assert_array_equal(cached[index]["audio"], local[index]["audio"])

    warm = cache_dataset(uri, str(tmp_path))
    assert warm.downloaded == [] and warm.downloaded_bytes == 0
    assert warm.kept == len(names)


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

    with pytest.raises(CacheIntegrityError, match=f"{name}: sha256 differs"):
        cache_dataset(uri, str(tmp_path))
    path = Path(cache_path(uri, str(tmp_path)))
    assert not (path / name).exists() and not (path / f"{name}.part").exists()
    assert not (path / DATASET_JSON).exists()
