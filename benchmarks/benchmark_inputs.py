"""Inputs the benchmarks share: demo corpora, their clip lengths, prepared datasets, work dirs.

Corpora come from `preprocess.demo_corpus` (offline espeak-ng speech in Common Voice layout).
Large ones synthesize only `unique_hours` and hard-link the rest, so their files repeat and, having
just been written, sit in the page cache: benchmarks read from memory, not from disk.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.benchmark_results import REPO_ROOT

ALL_SPLITS_MANIFEST = "all.tsv"


@contextlib.contextmanager
def work_directory(path: Path | None) -> Iterator[Path]:
    """`path` if given (kept afterwards, so corpora can be reused), else a temporary one."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="benchmark-") as temporary:
        yield Path(temporary)


def make_corpus(parent: Path, hours: float, unique_hours: float | None, seed: int) -> Path:
    """Generates a demo corpus under `parent` and returns a manifest holding all of its rows.

    The generator splits clips 80/10/10 into train/dev/test; benchmarks want all `hours` in one
    manifest, so the splits are concatenated into all.tsv beside them (same Common Voice
    columns, so clips/ is found the same way). An existing corpus with the same parameters is
    reused.
    """
    # Imported here: the GPU validation imports this module on a machine without audio codecs.
    from preprocess.demo_corpus import SPLITS, generate_corpus

    unique = hours if unique_hours is None else min(unique_hours, hours)
    directory = parent / f"corpus-{hours:g}h-unique{unique:g}h-seed{seed}"
    manifest = directory / ALL_SPLITS_MANIFEST
    if manifest.exists():
        return manifest
    generate_corpus(directory, hours=hours, unique_hours=unique, seed=seed)
    with open(manifest.with_suffix(".tmp"), "w", encoding="utf-8") as combined:
        for position, split in enumerate(SPLITS):
            lines = (directory / f"{split}.tsv").read_text(encoding="utf-8").splitlines(True)
            combined.writelines(lines if position == 0 else lines[1:])
    manifest.with_suffix(".tmp").replace(manifest)
    return manifest


def manifest_audio_files(manifest: Path) -> list[str]:
    """Audio file of every row, in manifest order, resolved as preprocessing resolves them."""
    with open(manifest, encoding="utf-8", newline="") as file:
        rows = csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [str(manifest.parent / "clips" / row["path"]) for row in rows]


def clip_num_samples(manifest: Path, sampling_rate: int = 16_000) -> np.ndarray:
    """Length of every clip at `sampling_rate`, from file headers (no decoding)."""
    import soundfile

    lengths = []
    for path in manifest_audio_files(manifest):
        info = soundfile.info(path)
        lengths.append(round(info.frames * sampling_rate / info.samplerate))
    return np.asarray(lengths, dtype=np.int64)


def prepare_dataset(
    manifest: Path, output_dir: Path, num_cpus: int | None, object_store_memory: int | None
) -> Path:
    """Runs the project's preprocessing CLI in its own process and returns the dataset dir.

    A separate process keeps Ray (its threads, daemons and workers) out of the benchmark
    process, whose DataLoader workers are forked. Rerunning on a finished dataset is a no-op.
    """
    command = [
        sys.executable,
        "-m",
        "preprocess.prepare_dataset",
        "--manifest",
        str(manifest),
        "--output_dir",
        str(output_dir),
    ]
    if num_cpus:
        command += ["--num_cpus", str(num_cpus)]
    if object_store_memory:
        command += ["--object_store_memory", str(object_store_memory)]
    # `python -m` from the repository root finds preprocess/ and argument_classes.py.
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"preprocessing failed ({completed.returncode}):\n{completed.stderr[-3000:]}"
        )
    return output_dir
