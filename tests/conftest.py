"""Shared fixtures: real Ray (local, 2 CPUs), espeak-ng speech, a real S3 server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from train.free_port import free_port


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def german_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Common Voice-layout corpus of espeak-ng German speech (~70 s)."""
    from train.demo_corpus import generate_corpus  # espeak-ng: not on GPU-only machines

    directory = tmp_path_factory.mktemp("corpus")
    generate_corpus(directory, hours=0.02, seed=1)
    return directory


@pytest.fixture(scope="session")
def sharded_dataset(ray_local, german_corpus, tmp_path_factory) -> Path:
    """The corpus's train split prepared for real in small tasks, a shard each: several shards,
    to read only (copy it before damaging it)."""
    from argument_classes import ManifestArguments, PreprocessArguments
    from preprocess.prepare_dataset import prepare

    output = tmp_path_factory.mktemp("sharded") / "train"
    prepare(
        ManifestArguments(manifest=str(german_corpus / "train.tsv")),
        PreprocessArguments(output_dir=str(output), rows_per_task=8),
    )
    return output


@pytest.fixture(scope="session")
def prepared(ray_local, german_corpus, tmp_path_factory) -> dict[str, Path]:
    """The corpus's train and dev splits prepared for real, for the trainer's tests to read."""
    from argument_classes import ManifestArguments, PreprocessArguments
    from preprocess.prepare_dataset import prepare

    root = tmp_path_factory.mktemp("prepared")
    for split in ("train", "dev"):
        prepare(
            ManifestArguments(manifest=str(german_corpus / f"{split}.tsv")),
            PreprocessArguments(output_dir=str(root / split)),
        )
    return {"train": root / "train", "dev": root / "dev", "corpus": german_corpus}


# Set before any Ray worker starts: workers inherit the environment they are started with.
S3_PORT = free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
    }
)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto in server mode on loopback; the AWS variables above point every S3 client at it."""
    executable = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield os.environ["AWS_ENDPOINT_URL"]
    process.terminate()
    process.wait(timeout=10)
