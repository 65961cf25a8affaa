"""A Ray worker killed mid-task: the run completes through Ray's retries, every row exactly once.

The pipeline runs in its own process with its own local Ray, so the worker killed is one of that
Ray's workers (found among the run's descendants), never one of the session's `ray_local`.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.ipc as ipc
from espeak_audio import REPO_ROOT

from preprocess import shard_format
from preprocess.prepare_dataset import TASK_MAX_RETRIES
from preprocess.shard_format import ShardDataset
from preprocess.verify_dataset import dataset_problems
from train.demo_corpus import generate_corpus

# The decode+write task's process title while it runs (ray::IDLE otherwise).
TASK_TITLE = "ray::Write"
TIMEOUT_SECONDS = 300


def running_task_worker(run: psutil.Process) -> psutil.Process | None:
    """A worker of the run's own Ray (a child of its raylet) that is executing a decode task."""
    for process in run.children(recursive=True):
        try:
            if process.cmdline()[:1] == [TASK_TITLE]:
                return process
        except psutil.Error:  # exited while we looked
            continue
    return None


def shard_ids(output: Path, metadata: dict) -> list[str]:
    """Every id physically in the committed shards, duplicates included."""
    ids = []
    for shard in metadata["shards"]:
        with pa.memory_map(str(output / shard["name"])) as source:
            ids += ipc.open_file(source).read_all().column("id").to_pylist()
    return ids


def test_killed_worker_is_retried_without_lost_duplicate_or_partial_shards(tmp_path):
    # Half an hour over a minute of unique speech (hard links): several seconds of decoding.
    corpus = tmp_path / "corpus"
    generate_corpus(corpus, hours=0.5, unique_hours=0.02, seed=2)
    manifest = corpus / "train.tsv"
    with open(manifest, encoding="utf-8", newline="") as file:
        manifest_ids = [
            row["path"] for row in csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        ]
    output = tmp_path / "out"
    log = tmp_path / "prepare.log"
    command = [
        sys.executable, "-m", "preprocess.prepare_dataset", "--manifest", str(manifest),
        "--output_dir", str(output), "--num_cpus", "2",
        "--object_store_memory", str(100 * 1024**2),
    ]  # fmt: skip
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, start_new_session=True, stdout=log_file, stderr=log_file
        )
    try:
        run = psutil.Process(process.pid)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        victim = None
        while victim is None:
            assert process.poll() is None, f"run ended before any kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no decode task started:\n{log.read_text()}"
            victim = running_task_worker(run)
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        code = process.wait(timeout=TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    output_log = log.read_text()
    assert code == 0, output_log
    # Ray logs the retry, with the retries prepare_dataset set: the kill hit a running task.
    assert f"There are {TASK_MAX_RETRIES} retries remaining" in output_log, output_log

    dataset = ShardDataset(str(output))  # checks every listed shard's size and footer
    counts = dataset.metadata["counts"]
    assert counts["input_rows"] == len(manifest_ids) == counts["accepted"] + counts["rejected"]
    ids = shard_ids(output, dataset.metadata)
    assert len(ids) == len(set(ids)), "a row was committed twice"
    assert sorted(ids) == sorted(dataset.length_index["id"].to_pylist())
    rejected = {r["id"] for r in shard_format.read_rejects(str(output), dataset.metadata)}
    assert set(ids) | rejected == set(manifest_ids) and not set(ids) & rejected
    assert dataset_problems(str(output)) == []  # sizes, footers and sha256 as recorded
    assert not (output / shard_format.STAGING_DIR).exists()
    listed = {shard["name"] for shard in dataset.metadata["shards"]}
    assert {f"{shard_format.SHARD_DIR}/{p.name}" for p in (output / "shards").iterdir()} == listed
