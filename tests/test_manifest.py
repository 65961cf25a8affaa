"""Manifest rows: where each row's audio is, its id, and what a missing value reads as."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from preprocess import storage
from preprocess.manifest import read_manifest
from preprocess.text_normalization import TextNormalizer


@pytest.mark.parametrize(
    ("root", "relative", "expected"),
    [
        ("/data/cv", "clips/a.mp3", "/data/cv/clips/a.mp3"),
        ("/data/cv/", "a.mp3", "/data/cv/a.mp3"),
        ("", "a.mp3", "a.mp3"),
        ("/data/cv", "/elsewhere/a.mp3", "/elsewhere/a.mp3"),
        ("/data/cv", "s3://bucket/a.mp3", "s3://bucket/a.mp3"),
        ("s3://bucket/cv", "clips/a.mp3", "s3://bucket/cv/clips/a.mp3"),
        ("s3://bucket/cv/", "/abs/a.mp3", "/abs/a.mp3"),
        ("/data/cv", "", "/data/cv/"),
    ],
)
def test_join_puts_relative_paths_under_the_root_and_keeps_the_rest(
    root: str, relative: str, expected: str
) -> None:
    assert storage.join(root, relative) == expected == storage.joiner(root)(relative)
    if not storage.is_remote(root) and not storage.is_remote(relative):
        assert expected == os.path.join(root, relative)


def test_jsonl_rows_keep_their_ids_and_read_missing_values_as_empty(tmp_path: Path) -> None:
    rows = [
        {"key": "r1", "audio": "clips/a.wav", "text": "Guten Tag!"},
        {"key": "r2", "audio": "/abs/b.wav", "text": None},  # reads as no transcript
        {"key": None, "audio": "s3://bucket/c.wav"},  # no id, no text
        {"key": "r4", "audio": None, "text": "Hallo."},  # no audio
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))

    table = read_manifest(
        str(manifest), TextNormalizer(), audio_column="audio", text_column="text", id_column="key"
    )

    assert table.column("id").to_pylist() == ["r1", "r2", "", "r4"]
    assert table.column("audio_uri").to_pylist() == [
        str(tmp_path / "clips/a.wav"),
        "/abs/b.wav",
        "s3://bucket/c.wav",
        "",
    ]
    assert table.column("sentence").to_pylist() == ["Guten Tag!", "", "", "Hallo."]
    assert table.column("text").to_pylist() == ["guten tag", "", "", "hallo"]


def test_rows_without_an_id_column_are_known_by_their_audio_path(tmp_path: Path) -> None:
    manifest = tmp_path / "train.tsv"
    manifest.write_text("client_id\tpath\tsentence\nc1\ta.mp3\tJa.\nc2\t\tNein.\n")

    table = read_manifest(str(manifest), TextNormalizer())

    assert table.column("id").to_pylist() == ["a.mp3", ""]
    assert table.column("audio_uri").to_pylist() == [str(tmp_path / "clips" / "a.mp3"), ""]
