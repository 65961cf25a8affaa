"""Preprocessing end to end through real Ray, real Arrow files and real espeak-ng speech."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import soundfile
import xxhash
from espeak_audio import REPO_ROOT, speak

from argument_classes import ManifestArguments, PreprocessArguments
from preprocess import shard_format
from preprocess.prepare_dataset import MIN_ROWS_PER_TASK, main, prepare, task_rows
from preprocess.shard_format import ShardDataset


def run_prepare(manifest: Path | str, output_dir: Path | str, **options) -> dict:
    manifest_options = {
        k: options.pop(k)
        for k in ("audio_column", "text_column", "audio_root", "id_column")
        if k in options
    }
    options.setdefault("rows_per_task", 16)
    return prepare(
        ManifestArguments(manifest=str(manifest), **manifest_options),
        PreprocessArguments(output_dir=str(output_dir), **options),
    )


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_tsv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = reference - estimate
    return float(10 * np.log10(np.sum(reference**2) / max(np.sum(noise**2), 1e-20)))


def test_common_voice_tsv_becomes_plain_arrow_shards(ray_local, german_corpus, tmp_path):
    rows = read_tsv(german_corpus / "train.tsv")
    summary = run_prepare(german_corpus / "train.tsv", tmp_path / "out")

    assert summary["accepted"] == len(rows) and summary["rejected"] == 0
    metadata = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert metadata["counts"]["input_rows"] == len(rows)
    assert metadata["sampling_rate"] == 16000
    for shard in metadata["shards"]:
        data = (tmp_path / "out" / shard["name"]).read_bytes()
        assert metadata["checksum"] == "xxh3_128"
        assert xxhash.xxh3_128(data).hexdigest() == shard["xxh3_128"]
        schema = ipc.open_file(pa.BufferReader(data)).schema
        assert schema.field("audio").type == pa.large_list(pa.float32())
        assert all(not isinstance(f.type, pa.ExtensionType) for f in schema)
        assert {"id", "num_samples", "text", "sentence", "client_id"} <= set(schema.names)

    dataset = ShardDataset(str(tmp_path / "out"))
    by_id = {row["path"]: row for row in rows}
    item = dataset[0]
    assert item["sentence"] == by_id[item["id"]]["sentence"]
    assert item["text"] == item["text"].lower() and "," not in item["text"]
    assert abs(dataset.total_hours * 3600 - summary["hours_out"] * 3600) < 1e-6

    from transformers import Wav2Vec2CTCTokenizer

    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "out" / "vocab.json"))
    all_text = " ".join(dataset[i]["text"] for i in range(len(dataset)))
    assert any(ch in all_text for ch in "äöüß")
    ids = tokenizer(all_text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, group_tokens=False) == all_text


# Channel c of a stereo clip holds TONES[c] and a mono clip both, so a downmix that drops or sums
# channels shows. Sources above 20 kHz add OUT_OF_BAND_TONE to channel 0: 16 kHz cannot hold
# it, and a resampler that aliases it instead of filtering it out puts it back into the band.
TONES = ((440.0, 0.4), (1250.0, 0.3))  # (Hz, amplitude)
OUT_OF_BAND_TONE = (10_000.0, 0.2)
CLIP_SECONDS = 1.5
# Filter and codec onsets: the analytic comparison skips this much at either end.
EDGE_SECONDS = 0.1


def sines(times: np.ndarray, tones: list[tuple[float, float]]) -> np.ndarray:
    """Sum of (Hz, amplitude) sines at `times` seconds, all starting at phase 0."""
    return sum(amplitude * np.sin(2 * np.pi * hz * times) for hz, amplitude in tones)


def write_tone_clip(
    path: Path, sampling_rate: int, channels: int, **write_args: str
) -> tuple[int, np.ndarray]:
    """Writes the tones at `sampling_rate`; returns its frames and the mono 16 kHz signal due."""
    channel_tones = [list(TONES)] if channels == 1 else [[tone] for tone in TONES]
    assert len(channel_tones) == channels
    times = np.arange(round(CLIP_SECONDS * sampling_rate)) / sampling_rate
    written = [
        sines(times, tones + ([OUT_OF_BAND_TONE] if c == 0 and sampling_rate > 20_000 else []))
        for c, tones in enumerate(channel_tones)
    ]
    soundfile.write(path, np.stack(written, axis=1).astype(np.float32), sampling_rate, **write_args)
    # The mono mix at 16 kHz: every in-band tone at its amplitude over the channel count.
    output_times = np.arange(round(CLIP_SECONDS * 16000)) / 16000
    mix = [(hz, amplitude / channels) for tones in channel_tones for hz, amplitude in tones]
    return times.size, sines(output_times, mix)


@pytest.mark.parametrize(
    ("sampling_rate", "channels", "extension", "write_args", "min_snr_db"),
    [
        (8000, 1, "wav", {}, 60),
        (22050, 2, "flac", {}, 60),
        # Lossy codecs add their own noise (measured: vorbis 40, opus 35, mp3 45 dB).
        (44100, 2, "ogg", {"format": "OGG", "subtype": "VORBIS"}, 25),
        (48000, 1, "opus", {"format": "OGG", "subtype": "OPUS"}, 25),
        (48000, 2, "mp3", {}, 25),
        (16000, 1, "wav", {"subtype": "PCM_16"}, 60),
    ],
)
def test_any_rate_and_channel_count_resamples_to_16k_mono(
    ray_local, tmp_path, sampling_rate, channels, extension, write_args, min_snr_db
):
    """The stored audio against the analytic mono mix of the tones at 16 kHz: frequency,
    amplitude and phase of each tone, with nothing aliased or imaged beside them."""
    audio = tmp_path / f"clip.{extension}"
    frames, expected = write_tone_clip(audio, sampling_rate, channels, **write_args)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio_filepath": str(audio), "text": "Töne"}) + "\n"
    )
    summary = run_prepare(
        tmp_path / "m.jsonl", tmp_path / "out", audio_column="audio_filepath", text_column="text"
    )
    assert summary["accepted"] == 1, summary

    stored = ShardDataset(str(tmp_path / "out"))[0]["audio"]
    assert stored.dtype == np.float32 and stored.ndim == 1
    assert abs(len(stored) - frames * 16000 / sampling_rate) <= 1
    edge = round(EDGE_SECONDS * 16000)
    inside = slice(edge, min(len(stored), len(expected)) - edge)
    assert snr_db(expected[inside], stored[inside].astype(np.float64)) >= min_snr_db


def test_csv_with_audio_root_and_nemo_jsonl(ray_local, german_corpus, tmp_path):
    rows = read_tsv(german_corpus / "dev.tsv")
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "transcript"])
        writer.writerows([[r["path"], r["sentence"]] for r in rows])
    (tmp_path / "m.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "audio_filepath": str(german_corpus / "clips" / r["path"]),
                    "text": r["sentence"],
                    "duration": 1.0,
                },
                ensure_ascii=False,
            )
            + "\n"
            for r in rows
        )
    )
    run_prepare(
        tmp_path / "m.csv",
        tmp_path / "from_csv",
        audio_column="file",
        text_column="transcript",
        audio_root=str(german_corpus / "clips"),
    )
    run_prepare(
        tmp_path / "m.jsonl",
        tmp_path / "from_jsonl",
        audio_column="audio_filepath",
        text_column="text",
    )
    from_csv = ShardDataset(str(tmp_path / "from_csv"))
    from_jsonl = ShardDataset(str(tmp_path / "from_jsonl"))
    assert len(from_csv) == len(from_jsonl) == len(rows)
    csv_items = {Path(item["id"]).name: item for item in from_csv}
    for item in from_jsonl:
        twin = csv_items[Path(item["id"]).name]
        assert twin["text"] == item["text"]
        np.testing.assert_array_equal(twin["audio"], item["audio"])


def test_every_bad_row_is_a_reject_with_a_reason(ray_local, german_corpus, tmp_path):
    rows = read_tsv(german_corpus / "train.tsv")[:6]
    clips = german_corpus / "clips"
    good = (clips / rows[0]["path"]).read_bytes()
    broken = {
        "corrupt.mp3": os.urandom(5000),
        "empty.mp3": b"",
        "truncated.wav": b"RIFF\x24\x00\x00\x00WAVEfmt ",
    }
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
    speech = speak("Ja.", tmp_path / "short.wav", 16000)
    soundfile.write(tmp_path / "short.wav", speech[:4000], 16000)
    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 40, np.float32), 16000)
    soundfile.write(
        tmp_path / "nan.wav", np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT"
    )
    (tmp_path / "fine.mp3").write_bytes(good)
    manifest = [{"path": str(clips / r["path"]), "text": r["sentence"]} for r in rows]
    expected = {
        "corrupt.mp3": "unreadable",
        "empty.mp3": "empty",
        "truncated.wav": "unreadable",
        "missing.flac": "missing",
        "short.wav": "too_short",
        "long.wav": "too_long",
        "nan.wav": "non_finite",
    }
    manifest += [{"path": str(tmp_path / name), "text": "Ein Satz."} for name in expected]
    manifest.append({"path": str(tmp_path / "fine.mp3"), "text": "?!"})
    manifest.append({"path": str(clips / rows[0]["path"]), "text": "Doppelt."})
    expected.update({"fine.mp3": "empty_transcript"})
    with open(tmp_path / "m.tsv", "w", encoding="utf-8") as file:
        file.write("path\ttext\n" + "".join(f"{m['path']}\t{m['text']}\n" for m in manifest))

    summary = run_prepare(
        tmp_path / "m.tsv", tmp_path / "out", audio_column="path", text_column="text"
    )

    metadata = json.loads((tmp_path / "out" / "dataset.json").read_text())
    counts = metadata["counts"]
    assert counts["input_rows"] == len(manifest) == counts["accepted"] + counts["rejected"]
    assert counts["accepted"] == len(rows) == summary["accepted"]
    # The audio in counts the clips rejected for their duration (0.25 s and 40 s) too.
    assert (summary["hours_in"] - summary["hours_out"]) * 3600 == pytest.approx(40.25)
    rejects = shard_format.read_rejects(str(tmp_path / "out"), metadata)
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    assert {name: reasons[name] for name in expected} == expected
    assert reasons[rows[0]["path"]] == "duplicate_id"
    assert all(r["path"] for r in rejects)


def test_rows_keep_manifest_order_whatever_order_tasks_finish(ray_local, german_corpus, tmp_path):
    # A task per row, 40-odd tasks on 2 workers: they finish in an order of their own, run by
    # run. The dataset (and every batch plan drawn from its length index) must still follow the
    # manifest, not the order in which tasks happened to finish.
    clips = tmp_path / "clips"
    clips.mkdir()
    rows = []
    for copy in range(4):
        for row in read_tsv(german_corpus / "train.tsv"):
            name = f"{copy}-{row['path']}"
            (clips / name).symlink_to(german_corpus / "clips" / row["path"])
            rows.append({**row, "path": name})
    write_tsv(tmp_path / "train.tsv", rows)

    summary = run_prepare(tmp_path / "train.tsv", tmp_path / "out", rows_per_task=1)
    assert summary["accepted"] == len(rows) > 30
    # Each task reports its own time: never more than the 2 CPUs' worth of the pipeline's.
    assert summary["tasks"] == len(rows) and summary["cpus"] == 2
    assert 0 < summary["task_cpu_seconds"] and 0 < summary["task_seconds"]
    assert summary["task_seconds"] <= 2 * summary["pipeline_seconds"]
    busy = summary["task_seconds"] / (2 * summary["pipeline_seconds"])
    assert summary["task_busy_fraction"] == pytest.approx(busy)
    index = ShardDataset(str(tmp_path / "out")).length_index
    assert index["id"].to_pylist() == [row["path"] for row in rows]


def test_rerun_processes_only_new_rows(ray_local, german_corpus, tmp_path):
    rows = read_tsv(german_corpus / "train.tsv")
    clips = tmp_path / "clips"
    clips.symlink_to(german_corpus / "clips")
    write_tsv(tmp_path / "train.tsv", rows[:10])
    first = run_prepare(tmp_path / "train.tsv", tmp_path / "out")
    first_shards = json.loads((tmp_path / "out" / "dataset.json").read_text())["shards"]

    write_tsv(tmp_path / "train.tsv", rows)
    second = run_prepare(tmp_path / "train.tsv", tmp_path / "out")
    assert first["accepted"] == 10
    assert second["already_processed"] == 10 and second["accepted"] == len(rows) - 10
    metadata = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert metadata["shards"][: len(first_shards)] == first_shards
    assert metadata["counts"]["accepted"] == len(rows)
    assert sorted(ShardDataset(str(tmp_path / "out")).length_index["id"].to_pylist()) == sorted(
        r["path"] for r in rows
    )

    third = run_prepare(tmp_path / "train.tsv", tmp_path / "out")
    assert third["message"].startswith("nothing to do")
    assert json.loads((tmp_path / "out" / "dataset.json").read_text()) == metadata


def test_killed_run_leaves_nothing_visible_and_next_run_completes(german_corpus, tmp_path):
    rows = read_tsv(german_corpus / "train.tsv")
    (tmp_path / "clips").symlink_to(german_corpus / "clips")
    # Unique ids over repeated clips make a run long enough to kill midway.
    many = [{**row, "path": row["path"]} for row in rows]
    write_tsv(tmp_path / "train.tsv", many)
    output = tmp_path / "out"
    run_prepare_cli = [
        sys.executable, "-m", "preprocess.prepare_dataset",
        "--manifest", str(tmp_path / "train.tsv"), "--output_dir", str(output),
        "--num_cpus", "1", "--rows_per_task", "2", "--decode_batch_size", "1",
        "--object_store_memory", str(100 * 1024**2),
    ]  # fmt: skip
    process = subprocess.Popen(
        run_prepare_cli, cwd=REPO_ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    staging = output / shard_format.STAGING_DIR
    deadline = time.monotonic() + 120
    while not (staging.exists() and any(staging.rglob("*.arrow"))):
        assert process.poll() is None, "run finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    assert not (output / "dataset.json").exists()
    with pytest.raises(FileNotFoundError):
        ShardDataset(str(output))

    subprocess.run(run_prepare_cli, cwd=REPO_ROOT, check=True, capture_output=True)
    dataset = ShardDataset(str(output))
    assert len(dataset) == len(rows)
    assert not staging.exists()
    listed = {s["name"] for s in dataset.metadata["shards"]}
    on_disk = {f"shards/{p.name}" for p in (output / "shards").iterdir()}
    assert on_disk == listed


@pytest.mark.parametrize(
    ("num_rows", "cpus", "max_rows", "expected_tasks"),
    [
        (8400, 2, 1024, 10),  # 9 tasks of at most 1024 rows, rounded up to 10: 5 per CPU
        (840, 2, 1024, 8),  # TASKS_PER_CPU tasks per CPU
        (17, 2, 1024, 3),  # rounding up to 4 would make tasks of 4-5 rows, below the floor
        (18, 1, 8, 3),
        (40, 1, 2, 20),  # --rows_per_task is a maximum, even below the floor
        (3, 4, 1024, 1),
    ],
)
def test_task_rows(num_rows, cpus, max_rows, expected_tasks):
    rows = task_rows(num_rows, cpus, max_rows)
    tasks = -(-num_rows // rows)
    assert tasks == expected_tasks
    assert rows <= max_rows
    # Never more tasks than tasks of the floor's size would make.
    assert tasks <= -(-num_rows // min(MIN_ROWS_PER_TASK, max_rows))


def test_reader_gives_zero_copy_views(ray_local, german_corpus, tmp_path):
    run_prepare(german_corpus / "dev.tsv", tmp_path / "out")
    dataset = ShardDataset(str(tmp_path / "out"))
    first, again = dataset[1]["audio"], dataset[1]["audio"]
    assert first.dtype == np.float32
    assert not first.flags.owndata and not first.flags.writeable
    # Two reads view the same mapped bytes; a copying reader would hand out separate buffers.
    assert np.shares_memory(first, again)
    assert len(first) == dataset.audio_lengths[1]
    # The normalization statistics were computed once, from the very samples stored.
    for index in range(len(dataset)):
        item = dataset[index]
        # float32 sums (audio_statistics): the mean to 1e-6 of the RMS, the std to 1e-6 relative.
        wide = item["audio"].astype(np.float64)
        assert item["audio_mean"] == pytest.approx(
            wide.mean(), abs=1e-6 * np.sqrt(np.mean(wide**2))
        )
        assert item["audio_std"] == pytest.approx(wide.std(), rel=1e-6)
        assert item["audio_std"] > 0


COLUMNS = ["--audio_column", "path", "--text_column", "sentence"]


@pytest.mark.parametrize(
    ("manifest_text", "extra", "message"),
    [
        (None, [], "manifest not found"),
        ("path\tsentence\n", COLUMNS, "no rows"),
        ("file\tsentence\na.wav\thallo\n", COLUMNS, "column 'path'"),
        ("file\tsentence\na.wav\thallo\n", [], "not a Common Voice TSV"),
    ],
)  # fmt: skip
def test_bad_manifest_is_one_line_error_before_work(
    tmp_path, capsys, manifest_text, extra, message
):
    manifest = tmp_path / "m.tsv"
    if manifest_text is not None:
        manifest.write_text(manifest_text)
    code = main(["--manifest", str(manifest), "--output_dir", str(tmp_path / "out"), *extra])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--sampling_rate", "0", "--sampling_rate must be positive, got 0"),
        ("--rows_per_task", "-1", "--rows_per_task must be positive, got -1"),
        ("--min_duration_seconds", "40", "--min_duration_seconds must be >= 0 and below"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, german_corpus, option, value, message):
    manifest = str(german_corpus / "dev.tsv")
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["--manifest", manifest, "--output_dir", str(output), option, value])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.splitlines() == [error] and error.startswith(f"error: {message}")
    assert not output.exists()


def test_s3_input_and_output(ray_local, s3_server, german_corpus, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="speech")
    rows = read_tsv(german_corpus / "dev.tsv")
    for row in rows:
        s3.upload_file(
            str(german_corpus / "clips" / row["path"]), "speech", f"cv/clips/{row['path']}"
        )
    s3.upload_file(str(german_corpus / "dev.tsv"), "speech", "cv/dev.tsv")

    summary = run_prepare("s3://speech/cv/dev.tsv", "s3://speech/prepared")
    assert summary["accepted"] == len(rows)

    local = tmp_path / "prepared"
    for entry in s3.list_objects_v2(Bucket="speech", Prefix="prepared/")["Contents"]:
        if entry["Key"].endswith("/"):  # directory markers pyarrow leaves
            continue
        target = local / entry["Key"].removeprefix("prepared/")
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("speech", entry["Key"], str(target))
    assert not (local / shard_format.STAGING_DIR).exists()
    from_s3 = ShardDataset(str(local))
    run_prepare(german_corpus / "dev.tsv", tmp_path / "from_disk")
    from_disk = ShardDataset(str(tmp_path / "from_disk"))
    assert sorted(i["id"] for i in from_s3) == sorted(i["id"] for i in from_disk)
    np.testing.assert_array_equal(
        from_s3[0]["audio"],
        next(i["audio"] for i in from_disk if i["id"] == from_s3[0]["id"]),
    )
