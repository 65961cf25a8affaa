"""Generate a synthetic German speech corpus in Common Voice layout.

The README demo, the tests and the benchmarks need a corpus that looks like a Common Voice
release (``clips/*.mp3`` plus ``train/dev/test.tsv``) but can be made offline in seconds.
Speech comes from espeak-ng's German voice; each "speaker" is a fixed combination of voice
variant, speed and pitch, and test/dev speakers are held out from train.

Usage::

    python -m preprocess.demo_corpus --output_dir D [--hours 0.05] [--unique_hours H]
        [--seed 0] [--num_workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import itertools
import math
import multiprocessing
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

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
# Sentences are assembled from the word lists below so there are many thousands of distinct
# ones. Templates start with a lower-case function word where German allows it; the
# sentence's first letter is capitalized at the end, which keeps joined clauses correct.

# (noun, gender) pairs; articles and adjective endings are inflected in _noun_phrase.
PEOPLE = (
    ("Bäcker", "m"),
    ("Ärztin", "f"),
    ("Bürgermeister", "m"),
    ("Lehrerin", "f"),
    ("Gärtner", "m"),
    ("Mädchen", "n"),
    ("Nachbar", "m"),
    ("Großmutter", "f"),
    ("Schüler", "m"),
    ("Verkäuferin", "f"),
    ("Förster", "m"),
    ("Köchin", "f"),
    ("Busfahrer", "m"),
    ("Studentin", "f"),
    ("Großvater", "m"),
    ("Tänzerin", "f"),
    ("Briefträger", "m"),
    ("Polizistin", "f"),
    ("Kind", "n"),
    ("Müller", "m"),
)
THINGS = (
    ("Schlüssel", "m"),
    ("Käse", "m"),
    ("Fußball", "m"),
    ("Koffer", "m"),
    ("Brief", "m"),
    ("Löffel", "m"),
    ("Apfel", "m"),
    ("Regenschirm", "m"),
    ("Zeitung", "f"),
    ("Tasche", "f"),
    ("Rechnung", "f"),
    ("Tür", "f"),
    ("Blume", "f"),
    ("Brille", "f"),
    ("Jacke", "f"),
    ("E-Mail", "f"),
    ("Frühstück", "n"),
    ("Fahrrad", "n"),
    ("Buch", "n"),
    ("Fenster", "n"),
    ("Gemüse", "n"),
    ("Brötchen", "n"),
    ("Geschenk", "n"),
    ("Wörterbuch", "n"),
    ("U-Bahn-Ticket", "n"),
)
NAMES = (
    "Anna",
    "Jürgen",
    "Sören",
    "Käthe",
    "Günther",
    "Jörg",
    "Lena",
    "Björn",
    "Mehmet",
    "Sophie",
    "Maximilian",
    "Frau Müller",
    "Herr Schäfer",
    "Frau Weiß",
    "Herr Groß",
    "Frau Özdemir",
)
# Stems only; _noun_phrase adds the ending after the definite article.
ADJECTIVES = (
    "grün",
    "groß",
    "klein",
    "schön",
    "alt",
    "neu",
    "rot",
    "blau",
    "süß",
    "frisch",
    "heiß",
    "kühl",
    "müde",
    "schwer",
    "fröhlich",
    "hübsch",
    "schmutzig",
    "glücklich",
    "weiß",
    "höflich",
    "mürrisch",
)
TRANSITIVE_VERBS = (
    "kauft",
    "sucht",
    "findet",
    "repariert",
    "öffnet",
    "vergisst",
    "trägt",
    "bemerkt",
    "holt",
    "bringt",
    "verkauft",
    "wäscht",
    "fotografiert",
    "bestellt",
    "verliert",
    "versteckt",
    "empfiehlt",
)
INTRANSITIVE_VERBS = (
    "arbeitet",
    "wartet",
    "schläft",
    "singt",
    "frühstückt",
    "tanzt",
    "spielt",
    "übt",
    "liest",
    "telefoniert",
)
PLACES = (
    "im Garten",
    "in der Küche",
    "auf der Straße",
    "am Bahnhof",
    "im Büro",
    "hinter dem Rathaus",
    "neben der Brücke",
    "vor der Bäckerei",
    "im Schwimmbad",
    "auf dem Marktplatz",
    "in der Bücherei",
    "am Flughafen",
    "unter dem Tisch",
    "im Wohnzimmer",
)
TIMES = (
    "am Montag",
    "am Dienstag",
    "am Mittwoch",
    "am Donnerstag",
    "am Freitag",
    "am Samstag",
    "am Sonntag",
    "heute Morgen",
    "morgen früh",
    "übermorgen",
    "jeden Tag",
    "im Frühling",
    "nach dem Frühstück",
    "um Mitternacht",
)
CITIES = (
    "München",
    "Köln",
    "Düsseldorf",
    "Lübeck",
    "Nürnberg",
    "Göttingen",
    "Saarbrücken",
    "Würzburg",
    "Gießen",
    "Frankfurt am Main",
    "Baden-Baden",
    "Garmisch-Partenkirchen",
    "Mönchengladbach",
    "Osnabrück",
    "Zürich",
    "Wien",
)
VEHICLES = ("der Zug", "der Bus", "die S-Bahn", "die U-Bahn", "die Fähre", "das Schiff")
COUNTABLE_PLURALS = (
    "Katzen",
    "Hunde",
    "Äpfel",
    "Brötchen",
    "Bücher",
    "Fahrräder",
    "Blumen",
    "Töchter",
    "Söhne",
    "Schlüssel",
    "Flaschen Wasser",
    "Stück Kuchen",
)
NUMBER_WORDS = {
    2: "zwei",
    3: "drei",
    4: "vier",
    5: "fünf",
    6: "sechs",
    7: "sieben",
    8: "acht",
    9: "neun",
    10: "zehn",
    11: "elf",
    12: "zwölf",
}
MONTHS = (
    "Januar",
    "Februar",
    "März",
    "April",
    "Mai",
    "Juni",
    "Juli",
    "August",
    "September",
    "Oktober",
    "November",
    "Dezember",
)
WEATHER = ("sonnig", "windig", "neblig", "schwül", "kühl", "ziemlich heiß")
CONNECTORS = (", und ", ", aber ", ", denn ", "; ", " - ", ": ", ", doch ")
OPENERS = ("ach so, ", "na ja, ", "ehrlich gesagt, ", "stell dir vor, ", "übrigens: ")
QUESTION_OPENERS = ("sag mal, ", "entschuldigung, ", "hallo, ")
SPEECH_VERBS = ("sagt", "ruft", "meint", "flüstert", "erklärt")
# Spoken length is estimated in characters with each digit counted as 6, since espeak-ng
# reads "1989" as "neunzehnhundertneunundachtzig". One such character takes about 80 ms at
# the slowest speed and 55 ms at the fastest, so these bounds keep clips within 1.5-10 s.
MIN_SPOKEN_CHARS = 30
MAX_SPOKEN_CHARS = 125
SPOKEN_CHARS_PER_DIGIT = 6

DEFINITE_ARTICLES = {
    "nom": {"m": "der", "f": "die", "n": "das"},
    "acc": {"m": "den", "f": "die", "n": "das"},
    "dat": {"m": "dem", "f": "der", "n": "dem"},
}


def _noun_phrase(rng: random.Random, nouns: Sequence[tuple[str, str]], case: str) -> str:
    noun, gender = rng.choice(nouns)
    article = DEFINITE_ARTICLES[case][gender]
    if rng.random() < 0.4:
        # Weak declension after a definite article: -e in nominative singular and in
        # feminine/neuter accusative, -en everywhere else.
        ending = "e" if case == "nom" or (case == "acc" and gender != "m") else "en"
        stem = rng.choice(ADJECTIVES)
        adjective = stem + (ending[1:] if stem.endswith("e") else ending)
        return f"{article} {adjective} {noun}"
    return f"{article} {noun}"


def _person(rng: random.Random, case: str = "nom") -> str:
    if rng.random() < 0.3:
        return rng.choice(NAMES)
    return _noun_phrase(rng, PEOPLE, case)


def _count(rng: random.Random, low: int = 2, high: int = 12) -> str:
    """A number in [low, high], as digits or spelled out, because both occur in real text."""
    number = rng.randint(low, high)
    if number in NUMBER_WORDS and rng.random() < 0.5:
        return NUMBER_WORDS[number]
    return str(number)


def _price(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"{rng.randint(1, 99)},{rng.randint(0, 99):02d} Euro"
    return f"{_count(rng, 2, 120)} Euro"


def _action_clause(rng: random.Random) -> str:
    clause = f"{_person(rng)} {rng.choice(TRANSITIVE_VERBS)} {_noun_phrase(rng, THINGS, 'acc')}"
    return f"{clause} {rng.choice(PLACES)}" if rng.random() < 0.4 else clause


def _routine_clause(rng: random.Random) -> str:
    return (
        f"{rng.choice(TIMES)} {rng.choice(INTRANSITIVE_VERBS)} {_person(rng)} {rng.choice(PLACES)}"
    )


def _departure_clause(rng: random.Random) -> str:
    minutes = f" {rng.randint(1, 59)}" if rng.random() < 0.5 else ""
    return (
        f"{rng.choice(VEHICLES)} nach {rng.choice(CITIES)} fährt um {rng.randint(0, 23)} "
        f"Uhr{minutes} ab"
    )


def _price_clause(rng: random.Random) -> str:
    return f"{_noun_phrase(rng, THINGS, 'nom')} kostet {_price(rng)}"


def _count_clause(rng: random.Random) -> str:
    return f"{_person(rng)} hat {_count(rng)} {rng.choice(COUNTABLE_PLURALS)}"


def _residence_clause(rng: random.Random) -> str:
    return f"{rng.choice(NAMES)} wohnt seit {_count(rng)} Jahren in {rng.choice(CITIES)}"


def _history_clause(rng: random.Random) -> str:
    return f"im Jahr {rng.randint(1950, 2024)} zog {rng.choice(NAMES)} nach {rng.choice(CITIES)}"


def _weather_clause(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"in {rng.choice(CITIES)} sind es heute {rng.randint(-5, 35)} Grad"
    return f"morgen wird es in {rng.choice(CITIES)} {rng.choice(WEATHER)}"


def _birthday_clause(rng: random.Random) -> str:
    return f"am {rng.randint(1, 28)}. {rng.choice(MONTHS)} feiert {rng.choice(NAMES)} Geburtstag"


CLAUSES: tuple[Callable[[random.Random], str], ...] = (
    _action_clause,
    _action_clause,
    _routine_clause,
    _departure_clause,
    _price_clause,
    _count_clause,
    _residence_clause,
    _history_clause,
    _weather_clause,
    _birthday_clause,
)


def _question(rng: random.Random) -> str:
    questions = (
        lambda: (
            f"warum {rng.choice(TRANSITIVE_VERBS)} {_person(rng)} "
            f"{_noun_phrase(rng, THINGS, 'acc')}?"
        ),
        lambda: f"hast du {_noun_phrase(rng, THINGS, 'acc')} {rng.choice(PLACES)} gesehen?",
        lambda: f"wann fährt {rng.choice(VEHICLES)} nach {rng.choice(CITIES)} ab?",
        lambda: f"wie viel kostet {_noun_phrase(rng, THINGS, 'nom')} eigentlich?",
        # Subordinate clause: the verb goes last.
        lambda: (
            f"weißt du, ob {_person(rng)} {rng.choice(TIMES)} {rng.choice(PLACES)} "
            f"{rng.choice(INTRANSITIVE_VERBS)}?"
        ),
    )
    question = rng.choice(questions)()
    return rng.choice(QUESTION_OPENERS) + question if rng.random() < 0.3 else question


def _exclamation(rng: random.Random) -> str:
    exclamations = (
        lambda: f"pass auf, {_noun_phrase(rng, THINGS, 'nom')} ist heiß!",
        lambda: f"vielen Dank für {_noun_phrase(rng, THINGS, 'acc')}!",
        lambda: f"komm schnell, {rng.choice(VEHICLES)} nach {rng.choice(CITIES)} wartet nicht!",
        lambda: "das ist ja unglaublich!",
        lambda: "Vorsicht an der Bahnsteigkante!",
    )
    return rng.choice(exclamations)()


def _statement(rng: random.Random) -> str:
    num_clauses = rng.choices((1, 2, 3), weights=(45, 38, 17))[0]
    text = rng.choice(CLAUSES)(rng)
    for _ in range(num_clauses - 1):
        text += rng.choice(CONNECTORS) + rng.choice(CLAUSES)(rng)
    if rng.random() < 0.15:
        text = rng.choice(OPENERS) + text
    return text + ("!" if rng.random() < 0.1 else ".")


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def _quote(rng: random.Random) -> str:
    quoted = rng.choice((_statement, _question, _exclamation))(rng)
    return f"{_person(rng)} {rng.choice(SPEECH_VERBS)}: „{_capitalize(quoted)}“"


def _make_sentence(rng: random.Random) -> str:
    """Return one random German sentence short enough to speak in under 10 s."""
    while True:
        kind = rng.choices((_statement, _question, _exclamation, _quote), weights=(70, 14, 6, 10))
        sentence = _capitalize(kind[0](rng))
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


def _clip_jobs(
    espeak: str, clips_dir: Path, speakers: dict[str, list[Speaker]], seed: int
) -> Iterator[tuple[str, _ClipJob]]:
    """Yield (split, job) for clip 0, 1, 2, ... forever, deterministically from the seed."""
    rng = random.Random(f"clips-{seed}")
    for index in itertools.count():
        split = SPLIT_CYCLE[index % len(SPLIT_CYCLE)]
        job = _ClipJob(
            espeak=espeak,
            speaker=rng.choice(speakers[split]),
            sentence=_make_sentence(rng),
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
) -> list[_Clip]:
    """Synthesize clips in order until their durations sum to target_seconds.

    Workers run ahead in batches; clips past the stopping point are deleted, so the result
    depends only on the seed, not on batch sizes or num_workers.
    """
    jobs = _clip_jobs(espeak, clips_dir, speakers, seed)
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
) -> CorpusSummary:
    """Write a synthetic Common Voice style corpus with `hours` of audio to output_dir.

    Only `unique_hours` (default: all of it) are synthesized; the rest are hard links to
    those clips under new names, which makes large benchmark corpora cheap. Output is
    deterministic given the seed.
    """
    if hours <= 0:
        raise ValueError(f"hours must be positive, got {hours}")
    if unique_hours is not None and unique_hours <= 0:
        raise ValueError(f"unique_hours must be positive, got {unique_hours}")
    espeak = _require_espeak()
    unique_hours = hours if unique_hours is None else min(unique_hours, hours)
    num_workers = num_workers or os.cpu_count() or 1
    output_dir = Path(output_dir)
    clips_dir = output_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)

    speakers = _make_speakers(seed)
    unique_clips = _synthesize_unique_clips(
        espeak, clips_dir, speakers, unique_hours * 3600, seed, num_workers
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
    args = parser.parse_args(argv)
    summary = generate_corpus(
        args.output_dir, args.hours, args.unique_hours, args.seed, args.num_workers
    )
    print(
        f"Wrote {args.output_dir}: train {summary.train_clips}, dev {summary.dev_clips}, "
        f"test {summary.test_clips} clips ({summary.unique_clips} unique), "
        f"{summary.hours:.3f} h"
    )


if __name__ == "__main__":
    main()
