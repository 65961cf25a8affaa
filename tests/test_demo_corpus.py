"""Tests for the synthetic Common Voice corpus generator, using the real espeak-ng."""

from __future__ import annotations

import csv
import hashlib
import random
from pathlib import Path

import pytest
import soundfile as sf

from train.demo_corpus import (
    CV_COLUMNS,
    SAMPLE_RATE,
    SPLITS,
    CorpusSummary,
    _make_sentence,
    generate_corpus,
)

HOURS = 0.02
# The generator stops at the first clip that reaches the target, so it overshoots by less
# than one clip (at most ~10 s).
MAX_OVERSHOOT_SECONDS = 10.5
GERMAN_SPECIAL_CHARS = set("äöüÄÖÜß")


def _read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, encoding="utf-8", newline="") as tsv:
        reader = csv.DictReader(tsv, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusSummary]:
    output_dir = tmp_path_factory.mktemp("corpus")
    return output_dir, generate_corpus(output_dir, hours=HOURS, seed=0, num_workers=2)


@pytest.fixture(scope="module")
def corpus_rows(corpus: tuple[Path, CorpusSummary]) -> dict[str, list[dict[str, str]]]:
    output_dir, _ = corpus
    return {split: _read_tsv(output_dir / f"{split}.tsv")[1] for split in SPLITS}


def test_tsvs_have_exactly_the_common_voice_header(corpus: tuple[Path, CorpusSummary]) -> None:
    output_dir, _ = corpus
    for split in SPLITS:
        header, rows = _read_tsv(output_dir / f"{split}.tsv")
        assert header == list(CV_COLUMNS)
        assert rows, f"{split}.tsv has no rows"
        assert all(row["locale"] == "de" for row in rows)


def test_every_clip_is_48k_mono_mp3_of_plausible_length(
    corpus: tuple[Path, CorpusSummary], corpus_rows: dict[str, list[dict[str, str]]]
) -> None:
    output_dir, _ = corpus
    for rows in corpus_rows.values():
        for row in rows:
            audio, rate = sf.read(output_dir / "clips" / row["path"])
            assert row["path"].endswith(".mp3")
            assert rate == SAMPLE_RATE
            assert audio.ndim == 1
            assert 0.5 < len(audio) / rate < 12.0


def test_test_and_dev_speakers_are_held_out(
    corpus_rows: dict[str, list[dict[str, str]]],
) -> None:
    speakers = {split: {row["client_id"] for row in rows} for split, rows in corpus_rows.items()}
    assert speakers["test"].isdisjoint(speakers["train"])
    assert speakers["dev"].isdisjoint(speakers["train"])
    assert speakers["dev"].isdisjoint(speakers["test"])


def test_sentences_contain_german_special_characters(
    corpus_rows: dict[str, list[dict[str, str]]],
) -> None:
    text = "".join(row["sentence"] for rows in corpus_rows.values() for row in rows)
    assert GERMAN_SPECIAL_CHARS & set(text)


def test_total_duration_matches_requested_hours(
    corpus: tuple[Path, CorpusSummary], corpus_rows: dict[str, list[dict[str, str]]]
) -> None:
    output_dir, summary = corpus
    seconds = sum(
        sf.info(output_dir / "clips" / row["path"]).duration
        for rows in corpus_rows.values()
        for row in rows
    )
    # MP3 decoding may add or drop a few milliseconds per clip.
    assert HOURS * 3600 - 1.0 <= seconds <= HOURS * 3600 + MAX_OVERSHOOT_SECONDS
    assert summary.total_seconds == pytest.approx(seconds, abs=1.0)
    assert summary.train_clips + summary.dev_clips + summary.test_clips == sum(
        len(rows) for rows in corpus_rows.values()
    )


def test_unique_hours_reuses_clips(tmp_path: Path) -> None:
    summary = generate_corpus(tmp_path, hours=HOURS, unique_hours=HOURS / 4, num_workers=1)
    paths = [
        tmp_path / "clips" / row["path"]
        for split in SPLITS
        for row in _read_tsv(tmp_path / f"{split}.tsv")[1]
    ]
    assert len(set(paths)) == len(paths)
    contents = {hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}
    assert len(contents) == summary.unique_clips < len(paths)
    assert summary.total_seconds >= HOURS * 3600


def test_same_seed_gives_same_corpus(tmp_path: Path) -> None:
    tsvs = []
    for num_workers in (1, 2):
        output_dir = tmp_path / f"workers{num_workers}"
        generate_corpus(output_dir, hours=0.005, seed=3, num_workers=num_workers)
        tsvs.append([(output_dir / f"{split}.tsv").read_text() for split in SPLITS])
    assert tsvs[0] == tsvs[1]


def test_missing_espeak_raises_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        generate_corpus(tmp_path / "corpus", hours=HOURS)


def test_sentences_of_a_seed_are_pinned() -> None:
    """Seed 0's sentences, pinned: the same as before the grammar moved from Python code to
    train/demo_corpus_german.yaml. A deliberate edit of that file changes them (update the pins
    then); a change of the generator's code must not."""
    rng = random.Random("clips-0")
    sentences = [_make_sentence(rng) for _ in range(2000)]
    assert sentences[:3] == [
        "Das schmutzige Kind sagt: „Vorsicht an der Bahnsteigkante!“",
        "Der frische Bürgermeister sagt: „Pass auf, der alte Apfel ist heiß!“",
        "Übrigens: der Bäcker bestellt das schmutzige Wörterbuch im Büro.",
    ]
    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()
    assert digest == "20a516152a7660e9689a53b5e8d79374a97530b6c36186c94032a886132393cd"
