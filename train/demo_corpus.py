"""Generate a synthetic German speech corpus in Common Voice layout.

The README demo, the tests and the benchmarks need a corpus that looks like a Common Voice
release (``clips/*.mp3`` plus ``train/dev/test.tsv``) but can be made offline in seconds.
Speech comes from espeak-ng's German voice; each "speaker" is a fixed combination of voice
variant, speed and pitch, and test/dev speakers are held out from train. The sentences come
from the word lists and the small grammar in demo_corpus_german.yaml beside this file.

Usage::

    python -m train.demo_corpus --output_dir D [--hours 0.05] [--unique_hours H]
        [--seed 0] [--num_workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import itertools
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import yaml

CV_COLUMNS = (
    "client_id",
    "path",
    "sentence_id",
    "sentence",
    "sentence_domain",
    "up_votes",
    "down_votes",
    "age",
    "gender",
    "accents",
    "variant",
    "locale",
    "segment",
)
SPLITS = ("train", "dev", "test")
SAMPLE_RATE = 48_000
LOCALE = "de"

# Clip i goes to SPLIT_CYCLE[i % 10]: 80/10/10 by clip count, and the first three clips
# already cover every split, so even a tiny corpus has all three.
SPLIT_CYCLE = ("train", "dev", "test", *("train",) * 7)
# Real Common Voice clip numbers have 8 digits.
CLIP_NUMBER_BASE = 10_000_000
# About -70 dBFS: inaudible, but makes every synthesized clip unique even when the same
# speaker reads the same sentence twice.
NOISE_STD = 3e-4
# Used to size the first synthesis batch before any real duration has been measured.
EXPECTED_CLIP_SECONDS = 5.0

NUM_SPEAKERS = {"train": 18, "dev": 3, "test": 3}
SPEED_RANGE_WPM = (130, 200)
PITCH_RANGE = (30, 70)
# espeak-ng variants that sound distinct in German; gender in Common Voice's vocabulary.
VOICE_VARIANTS = {
    **{f"m{i}": "male_masculine" for i in range(1, 8)},
    **{f"f{i}": "female_feminine" for i in range(1, 6)},
    "klatt": "",
    "klatt2": "",
    "klatt3": "",
    "klatt4": "",
    "Andy": "male_masculine",
    "anika": "female_feminine",
    "benjamin": "male_masculine",
    "max": "male_masculine",
    "norbert": "male_masculine",
    "linda": "female_feminine",
    "grandma": "female_feminine",
    "grandpa": "male_masculine",
}
AGES = ("", "teens", "twenties", "thirties", "fourties", "fifties", "sixties", "seventies")


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: a fixed espeak-ng voice variant, speed and pitch."""

    variant: str
    speed_wpm: int
    pitch: int
    age: str
    gender: str

    @property
    def client_id(self) -> str:
        """Stable id derived from the voice settings, like Common Voice's hashed client ids."""
        voice = f"{self.variant}|{self.speed_wpm}|{self.pitch}"
        return hashlib.sha1(voice.encode()).hexdigest()


@dataclass(frozen=True)
class CorpusSummary:
    """What generate_corpus wrote: clips per split, distinct recordings and total audio."""

    train_clips: int
    dev_clips: int
    test_clips: int
    unique_clips: int
    total_seconds: float

    @property
    def hours(self) -> float:
        return self.total_seconds / 3600


@dataclass(frozen=True)
class _ClipJob:
    """Everything a worker process needs to synthesize and write one clip."""

    espeak: str
    speaker: Speaker
    sentence: str
    noise_seed: int
    path: Path


@dataclass(frozen=True)
class _Clip:
    """One TSV row."""

    file_name: str
    split: str
    speaker: Speaker
    sentence: str
    seconds: float


# --- Sentences ---------------------------------------------------------------------------

GRAMMAR_FILE = Path(__file__).with_name("demo_corpus_german.yaml")
# Spoken length is estimated in characters with each digit counted as 6, since espeak-ng
# reads "1989" as "neunzehnhundertneunundachtzig". One such character takes about 80 ms at
# the slowest speed and 55 ms at the fastest, so these bounds keep clips within 1.5-10 s.
MIN_SPOKEN_CHARS = 30
MAX_SPOKEN_CHARS = 125
SPOKEN_CHARS_PER_DIGIT = 6

_SLOT = re.compile(r"\{([^{}]+)\}")
_INTEGER_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


class _Grammar:
    """Expands the rules of GRAMMAR_FILE, whose header describes their notation."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.rules: dict = data["rules"]
        self.words: dict[str, list[str]] = data["words"]
        self.nouns = {name: list(nouns.items()) for name, nouns in data["nouns"].items()}

    def expand(
        self, rng: random.Random, rule: str | dict, parts: dict[str, str] | None = None
    ) -> str:
        """One random expansion of `rule`; `parts` are the values of a `first:` for its slots."""
        if isinstance(rule, str):
            return _SLOT.sub(lambda slot: self._fill(rng, slot[1], parts or {}), rule)
        if "one_of" in rule:
            if "weights" in rule:
                return self.expand(rng, rng.choices(rule["one_of"], rule["weights"])[0])
            return self.expand(rng, rng.choice(rule["one_of"]))
        if "chance" in rule:
            return self.expand(
                rng, rule["then"] if rng.random() < rule["chance"] else rule.get("else", "")
            )
        if "first" in rule:
            drawn = {name: self.expand(rng, part) for name, part in rule["first"].items()}
            return self.expand(rng, rule["text"], drawn)
        raise ValueError(f"{GRAMMAR_FILE.name}: not a rule: {rule!r}")

    def _fill(self, rng: random.Random, slot: str, parts: dict[str, str]) -> str:
        """The text for one `{slot}` of a template."""
        source, _, modifier = slot.partition(" ")
        integers = _INTEGER_RANGE.fullmatch(source)
        if source in self.nouns and modifier in self.data["articles"]:
            return self._noun_phrase(rng, source, modifier)
        if integers and modifier in ("", "two_digits", "spelled"):
            return self._integer(rng, int(integers[1]), int(integers[2]), modifier)
        if modifier not in ("", "capitalized"):
            raise ValueError(f"{GRAMMAR_FILE.name}: unknown slot {{{slot}}}")
        if source in parts:
            text = parts[source]
        elif source in self.rules:
            text = self.expand(rng, self.rules[source])
        elif source in self.words:
            text = rng.choice(self.words[source])
        else:
            raise ValueError(f"{GRAMMAR_FILE.name}: unknown slot {{{slot}}}")
        return _capitalize(text) if modifier else text

    def _noun_phrase(self, rng: random.Random, nouns: str, case: str) -> str:
        noun, gender = rng.choice(self.nouns[nouns])
        article = self.data["articles"][case][gender]
        if rng.random() < self.data["adjective_chance"]:
            ending = self.data["adjective_endings"][case][gender]
            stem = rng.choice(self.data["adjectives"])
            adjective = stem + (ending[1:] if stem.endswith("e") else ending)
            return f"{article} {adjective} {noun}"
        return f"{article} {noun}"

    def _integer(self, rng: random.Random, low: int, high: int, modifier: str) -> str:
        number = rng.randint(low, high)
        if modifier == "two_digits":
            return f"{number:02d}"
        words = self.data["number_words"]
        if modifier == "spelled" and number in words and rng.random() < self.data["spelled_chance"]:
            return words[number]
        return str(number)


@functools.cache
def _grammar() -> _Grammar:
    with open(GRAMMAR_FILE, encoding="utf-8") as file:
        return _Grammar(yaml.safe_load(file))


def _make_sentence(rng: random.Random) -> str:
    """Return one random German sentence short enough to speak in under 10 s."""
    while True:
        sentence = _capitalize(_grammar().expand(rng, "{sentence}"))
        digits = sum(char.isdigit() for char in sentence)
        spoken_chars = len(sentence) + (SPOKEN_CHARS_PER_DIGIT - 1) * digits
        if MIN_SPOKEN_CHARS <= spoken_chars <= MAX_SPOKEN_CHARS:
            return sentence


# --- Synthesis ---------------------------------------------------------------------------


def _require_espeak() -> str:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng not found; install it with `apt-get install espeak-ng`")
    return espeak


def _make_speakers(seed: int) -> dict[str, list[Speaker]]:
    """Draw disjoint speaker pools per split, so dev and test speakers are never in train."""
    rng = random.Random(f"speakers-{seed}")
    speakers: list[Speaker] = []
    voices: set[tuple[str, int, int]] = set()
    while len(speakers) < sum(NUM_SPEAKERS.values()):
        variant = rng.choice(sorted(VOICE_VARIANTS))
        voice = (variant, rng.randint(*SPEED_RANGE_WPM), rng.randint(*PITCH_RANGE))
        if voice in voices:
            continue
        voices.add(voice)
        speakers.append(Speaker(*voice, age=rng.choice(AGES), gender=VOICE_VARIANTS[variant]))
    pools: dict[str, list[Speaker]] = {}
    start = 0
    for split in SPLITS:
        pools[split] = speakers[start : start + NUM_SPEAKERS[split]]
        start += NUM_SPEAKERS[split]
    return pools


def _clip_name(index: int) -> str:
    return f"common_voice_{LOCALE}_{CLIP_NUMBER_BASE + index:08d}.mp3"


def _synthesize_clip(job: _ClipJob) -> float:
    """Speak job.sentence, write it as a 48 kHz MP3 and return its duration in seconds."""
    # -b 1: the text argument is UTF-8 regardless of the caller's locale.
    command = [job.espeak, "-v", f"{LOCALE}+{job.speaker.variant}", "-b", "1"]
    command += ["-s", str(job.speaker.speed_wpm), "-p", str(job.speaker.pitch)]
    wav = subprocess.run(
        [*command, "--stdout", job.sentence], capture_output=True, check=True
    ).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = soxr.resample(samples, rate, SAMPLE_RATE)
    noise = np.random.default_rng(job.noise_seed).normal(0.0, NOISE_STD, audio.shape)
    sf.write(job.path, (audio + noise).astype(np.float32), SAMPLE_RATE, format="MP3")
    return len(audio) / SAMPLE_RATE


def _first_words(sentence: str, max_words: int | None) -> str:
    """The sentence cut to its first `max_words` words (all of it for None), without a
    dangling comma: short utterances like commands, from the same draws."""
    if max_words is None:
        return sentence
    return " ".join(sentence.split()[:max_words]).rstrip(",;:")


def _clip_jobs(
    espeak: str,
    clips_dir: Path,
    speakers: dict[str, list[Speaker]],
    seed: int,
    max_words: int | None,
) -> Iterator[tuple[str, _ClipJob]]:
    """Yield (split, job) for clip 0, 1, 2, ... forever, deterministically from the seed."""
    rng = random.Random(f"clips-{seed}")
    for index in itertools.count():
        split = SPLIT_CYCLE[index % len(SPLIT_CYCLE)]
        job = _ClipJob(
            espeak=espeak,
            speaker=rng.choice(speakers[split]),
            sentence=_first_words(_make_sentence(rng), max_words),
            noise_seed=rng.getrandbits(64),
            path=clips_dir / _clip_name(index),
        )
        yield split, job


@contextlib.contextmanager
def _parallel_map(num_workers: int) -> Iterator[Callable[[Callable, list], list]]:
    """Yield an ordered map over num_workers processes; in-process when there is just one."""
    if num_workers == 1:
        yield lambda function, items: list(map(function, items))
        return
    with multiprocessing.Pool(num_workers) as pool:
        yield pool.map


def _synthesize_unique_clips(
    espeak: str,
    clips_dir: Path,
    speakers: dict[str, list[Speaker]],
    target_seconds: float,
    seed: int,
    num_workers: int,
    max_words: int | None,
) -> list[_Clip]:
    """Synthesize clips in order until their durations sum to target_seconds.

    Workers run ahead in batches; clips past the stopping point are deleted, so the result
    depends only on the seed, not on batch sizes or num_workers.
    """
    jobs = _clip_jobs(espeak, clips_dir, speakers, seed, max_words)
    clips: list[_Clip] = []
    total_seconds = 0.0

    def done() -> bool:
        return total_seconds >= target_seconds and len(clips) >= len(SPLITS)

    with _parallel_map(num_workers) as parallel_map:
        while not done():
            mean_seconds = total_seconds / len(clips) if clips else EXPECTED_CLIP_SECONDS
            needed = math.ceil((target_seconds - total_seconds) / mean_seconds)
            batch = list(itertools.islice(jobs, max(needed, len(SPLITS), num_workers)))
            durations = parallel_map(_synthesize_clip, [job for _, job in batch])
            for (split, job), seconds in zip(batch, durations, strict=True):
                if done():
                    job.path.unlink()
                    continue
                clips.append(_Clip(job.path.name, split, job.speaker, job.sentence, seconds))
                total_seconds += seconds
    return clips


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.unlink(missing_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        # Some filesystems (and some container mounts) refuse hard links.
        shutil.copyfile(source, destination)


def _reuse_clips(
    clips_dir: Path, unique_clips: list[_Clip], target_seconds: float, seed: int
) -> list[_Clip]:
    """Add rows that reuse already synthesized audio under new clip names until the
    corpus holds target_seconds; a row only reuses a clip from its own split so held-out
    speakers stay held out."""
    rng = random.Random(f"reuse-{seed}")
    by_split = {split: [c for c in unique_clips if c.split == split] for split in SPLITS}
    total_seconds = sum(clip.seconds for clip in unique_clips)
    reused: list[_Clip] = []
    for index in itertools.count(len(unique_clips)):
        if total_seconds >= target_seconds:
            break
        source = rng.choice(by_split[SPLIT_CYCLE[index % len(SPLIT_CYCLE)]])
        clip = replace(source, file_name=_clip_name(index))
        _link_or_copy(clips_dir / source.file_name, clips_dir / clip.file_name)
        reused.append(clip)
        total_seconds += clip.seconds
    return reused


def _write_tsvs(output_dir: Path, clips: list[_Clip]) -> None:
    for split in SPLITS:
        with open(output_dir / f"{split}.tsv", "w", encoding="utf-8", newline="") as tsv:
            writer = csv.writer(tsv, delimiter="\t", lineterminator="\n")
            writer.writerow(CV_COLUMNS)
            for clip in clips:
                if clip.split != split:
                    continue
                writer.writerow(
                    (
                        clip.speaker.client_id,
                        clip.file_name,
                        hashlib.sha256(clip.sentence.encode()).hexdigest(),
                        clip.sentence,
                        "",
                        2,
                        0,
                        clip.speaker.age,
                        clip.speaker.gender,
                        "",
                        "",
                        LOCALE,
                        "",
                    )
                )


def generate_corpus(
    output_dir: str | Path,
    hours: float = 0.05,
    unique_hours: float | None = None,
    seed: int = 0,
    num_workers: int | None = None,
    max_words: int | None = None,
) -> CorpusSummary:
    """Write a synthetic Common Voice style corpus with `hours` of audio to output_dir.

    Only `unique_hours` (default: all of it) are synthesized; the rest are hard links to
    those clips under new names, which makes large benchmark corpora cheap. Output is
    deterministic given the seed. `max_words` cuts every sentence to its first words, for a
    corpus of short clips (commands, keyword spotting) instead of Common Voice's 1.5-10 s.
    """
    if hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    if unique_hours is not None and unique_hours <= 0:
        raise ValueError(f"unique_hours must be positive, got {unique_hours}")
    if max_words is not None and max_words <= 0:
        raise ValueError(f"max_words must be positive, got {max_words}")
    espeak = _require_espeak()
    unique_hours = hours if unique_hours is None else min(unique_hours, hours)
    num_workers = num_workers or os.cpu_count() or 1
    output_dir = Path(output_dir)
    clips_dir = output_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)

    speakers = _make_speakers(seed)
    unique_clips = _synthesize_unique_clips(
        espeak, clips_dir, speakers, unique_hours * 3600, seed, num_workers, max_words
    )
    clips = unique_clips + _reuse_clips(clips_dir, unique_clips, hours * 3600, seed)
    _write_tsvs(output_dir, clips)
    return CorpusSummary(
        train_clips=sum(clip.split == "train" for clip in clips),
        dev_clips=sum(clip.split == "dev" for clip in clips),
        test_clips=sum(clip.split == "test" for clip in clips),
        unique_clips=len(unique_clips),
        total_seconds=sum(clip.seconds for clip in clips),
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; prints a one-line summary."""
    parser = argparse.ArgumentParser(description="Generate a synthetic German Common Voice corpus.")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--hours", type=float, default=0.05, help="total audio to produce")
    parser.add_argument(
        "--unique_hours",
        type=float,
        default=None,
        help="distinct audio to synthesize; the rest reuses it (default: --hours)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num_workers", type=int, default=None, help="synthesis processes (default: all CPUs)"
    )
    parser.add_argument(
        "--max_words", type=int, default=None, help="cut sentences to this many words (short clips)"
    )
    args = parser.parse_args(argv)
    summary = generate_corpus(
        args.output_dir, args.hours, args.unique_hours, args.seed, args.num_workers, args.max_words
    )
    print(
        f"Wrote {args.output_dir}: train {summary.train_clips}, dev {summary.dev_clips}, "
        f"test {summary.test_clips} clips ({summary.unique_clips} unique), "
        f"{summary.hours:.3f} h"
    )


if __name__ == "__main__":
    main()
