"""Checks the benchmark tests share: rows against raw measurements, corpora from file headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import soundfile

from benchmarks.harness import make_corpus, manifest_audio_files

SAMPLING_RATE = 16_000


def assert_rows(
    document: dict[str, Any], expected: dict[tuple[str, str], tuple[float, float]]
) -> None:
    """The result table is exactly `expected`: per (metric, baseline_name), the figures for ours
    and the baseline that the test recomputed from the raw measurements in the details."""
    rows = {(row["metric"], row["baseline_name"]): row for row in document["rows"]}
    assert len(rows) == len(document["rows"]), "a row appears twice"
    assert sorted(rows) == sorted(expected)
    for key, (ours, baseline) in expected.items():
        assert rows[key]["ours"] == pytest.approx(ours), key
        assert rows[key]["baseline"] == pytest.approx(baseline), key
        assert rows[key]["ratio"] == pytest.approx(ours / baseline), key


def corpus_clips_and_seconds(
    work_dir: Path, hours: float, unique_hours: float, max_words: int | None = None
) -> tuple[int, float]:
    """Clips of the demo corpus a benchmark made in `work_dir` (reused, not made again) and
    their seconds from the file headers, which neither our decoding nor HF's touches."""
    files = manifest_audio_files(make_corpus(work_dir, hours, unique_hours, 0, max_words))
    return len(files), sum(soundfile.info(path).duration for path in files)


def resampled_seconds(clips: int, seconds: float) -> Any:
    """`seconds` as resampled audio holds it: each clip's length rounds to a whole sample."""
    return pytest.approx(seconds, abs=clips / SAMPLING_RATE)
