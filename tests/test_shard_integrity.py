"""Damaged datasets: opening names the bad shard in one line; verify_dataset lists every problem.

Each test damages its own copy of one dataset prepared by the real pipeline from espeak-ng speech.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from preprocess.shard_format import DATASET_JSON, ShardDataset, ShardIntegrityError
from preprocess.verify_dataset import dataset_problems
from preprocess.verify_dataset import main as verify_main


@pytest.fixture
def dataset(sharded_dataset, tmp_path) -> Path:
    """A private copy to damage; with at least two shards, so naming the right one matters."""
    copy = Path(shutil.copytree(sharded_dataset, tmp_path / "dataset"))
    assert len(read_metadata(copy)["shards"]) >= 2
    return copy


def read_metadata(dataset: Path) -> dict:
    return json.loads((dataset / DATASET_JSON).read_text())


def write_metadata(dataset: Path, metadata: dict) -> None:
    (dataset / DATASET_JSON).write_text(json.dumps(metadata))


def second_shard(dataset: Path) -> tuple[str, Path]:
    name = read_metadata(dataset)["shards"][1]["name"]
    return name, dataset / name


def verify(dataset: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = verify_main([str(dataset)])
    return code, capsys.readouterr().out.splitlines()


def truncate(dataset: Path) -> str:
    _, path = second_shard(dataset)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"truncated: expected {size} bytes, found {size // 2}"


def delete(dataset: Path) -> str:
    second_shard(dataset)[1].unlink()
    return "missing"


def overwrite_footer_magic(dataset: Path) -> str:
    with open(second_shard(dataset)[1], "r+b") as file:
        file.seek(-6, os.SEEK_END)
        file.write(b"\0" * 6)
    return "not an Arrow file"


def list_absent_shard(dataset: Path) -> str:
    """dataset.json names a shard that is not there (in place of the real second shard)."""
    metadata = read_metadata(dataset)
    metadata["shards"][1]["name"] = "shards/shard-never-written.arrow"
    write_metadata(dataset, metadata)
    return "missing"


@pytest.mark.parametrize(
    "damage",
    [truncate, delete, overwrite_footer_magic, list_absent_shard],
    ids=lambda d: d.__name__,
)
def test_damaged_shard_stops_open_with_one_line_naming_it(
    dataset: Path, capsys, damage: Callable[[Path], str]
):
    problem = damage(dataset)
    name, path = second_shard(dataset)

    with pytest.raises(ShardIntegrityError) as error:
        ShardDataset(str(dataset))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert str(path) in message and problem in message, message

    code, lines = verify(dataset, capsys)
    assert code == 1
    assert len(lines) == 1 and name in lines[0] and problem in lines[0], lines


def test_flipped_audio_byte_opens_but_fails_verification(dataset: Path, capsys):
    name, path = second_shard(dataset)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the audio is nearly all of a shard's bytes
    path.write_bytes(bytes(data))

    opened = ShardDataset(str(dataset))  # size and footer are intact: opening stays cheap
    assert all(len(item["audio"]) > 0 for item in opened)
    code, lines = verify(dataset, capsys)
    assert code == 1
    assert len(lines) == 1 and name in lines[0] and "checksum mismatch" in lines[0], lines


def test_verify_lists_every_problem(dataset: Path, capsys):
    shards = read_metadata(dataset)["shards"]
    first, second = (dataset / shards[0]["name"]), (dataset / shards[1]["name"])
    os.truncate(first, 100)
    second.unlink()
    code, lines = verify(dataset, capsys)
    assert code == 1
    assert len(lines) == 2
    assert shards[0]["name"] in lines[0] and "truncated" in lines[0]
    assert shards[1]["name"] in lines[1] and "missing" in lines[1]


def test_clean_dataset_verifies(dataset: Path, capsys):
    code, lines = verify(dataset, capsys)
    assert code == 0 and lines == [f"{dataset}: ok, every shard matches dataset.json"]
    with pytest.raises(SystemExit) as exit_info:
        verify_main(["--help"])
    assert exit_info.value.code == 0 and "checksum" in capsys.readouterr().out


def test_dataset_without_recorded_sizes_opens_and_footers_are_still_checked(dataset: Path):
    """Datasets written before sizes and checksums were recorded."""
    metadata = read_metadata(dataset)
    for shard in metadata["shards"]:
        del shard["bytes"], shard["xxh3_128"]
    write_metadata(dataset, metadata)
    assert len(ShardDataset(str(dataset))) == metadata["counts"]["accepted"]

    truncate(dataset)
    with pytest.raises(ShardIntegrityError, match="not an Arrow file"):
        ShardDataset(str(dataset))


def test_verify_reads_s3(s3_server, dataset: Path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="integrity")
    for path in dataset.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "integrity", f"ds/{path.relative_to(dataset)}")
    assert dataset_problems("s3://integrity/ds") == []

    problem = truncate(dataset)
    name, path = second_shard(dataset)
    s3.upload_file(str(path), "integrity", f"ds/{name}")
    assert dataset_problems("s3://integrity/ds") == [f"shard s3://integrity/ds/{name}: {problem}"]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
def test_opening_reads_no_audio(dataset: Path):
    """Open in O(shards): a few bytes of each shard, no shard mapped or left open."""
    shard_paths = [str(dataset / s["name"]) for s in read_metadata(dataset)["shards"]]
    shard_bytes = sum(os.path.getsize(p) for p in shard_paths)
    assert shard_bytes > 1024**2
    ShardDataset(str(dataset))  # once first, so lazy imports don't count below

    before = read_chars()
    opened = ShardDataset(str(dataset))
    read = read_chars() - before

    assert read < 64 * 1024, f"opening read {read} bytes; the shards hold {shard_bytes}"
    maps = Path("/proc/self/maps").read_text()
    open_files = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    assert not any(p in maps or p in open_files for p in shard_paths)
    assert len(opened[0]["audio"]) > 0  # reading a row maps its shard, which the check above sees
    assert any(p in Path("/proc/self/maps").read_text() for p in shard_paths)


def read_chars() -> int:
    """Bytes this process has read through read(2) and friends so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_dataset_of_the_previous_format_stops_with_a_rerun_hint(dataset: Path):
    metadata = read_metadata(dataset)
    metadata["format_version"] = 1
    write_metadata(dataset, metadata)
    with pytest.raises(ValueError, match=r"format version 1.*re-run python -m preprocess"):
        ShardDataset(str(dataset))
