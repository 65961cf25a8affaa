"""ShardWriter on its own: rows come back in order and intact, whatever the batch buffer did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import xxhash

from preprocess import shard_format


def test_rows_survive_buffer_growth_batches_and_rollover(tmp_path: Path):
    rng = np.random.default_rng(0)
    # Mostly short clips, with long ones mid-batch so the reused buffer is flushed early and
    # grown; one clip sits on a DC offset, where a sum-of-squares variance would cancel.
    lengths = [int(n) for n in rng.integers(800, 4000, 37)]
    lengths[5], lengths[6], lengths[20] = 50_000, 120_000, 3_000
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]
    clips[20] = (0.5 + 1e-3 * rng.standard_normal(3_000)).astype(np.float32)
    schema = shard_format.shard_schema(["speaker"])
    writer = shard_format.ShardWriter(str(tmp_path), "shard-t", schema, 200_000, 8)
    for index, clip in enumerate(clips):
        # Extra manifest fields (audio_uri) are not shard columns and must be left out.
        row = {"id": f"u{index}", "text": "ab" * index, "sentence": "Ab", "speaker": None}
        writer.add(
            {**row, "audio_uri": f"/a/{index}.wav"}, clip, *shard_format.audio_statistics(clip)
        )
    shards = writer.close()

    assert len(shards) > 2  # rolled over at 200 kB
    ids, audio, batch_rows = [], [], []
    for shard in shards:
        data = (tmp_path / shard.name).read_bytes()
        assert (shard.bytes, shard.checksum) == (len(data), xxhash.xxh3_128(data).hexdigest())
        reader = ipc.open_file(pa.BufferReader(data))
        assert reader.schema == schema
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        batch_rows += [batch.num_rows for batch in batches]
        table = pa.Table.from_batches(batches)
        assert table.column("id").to_pylist() == shard.ids
        assert table.column("num_samples").to_pylist() == shard.num_samples
        assert table.column("audio_mean").to_pylist() == shard.audio_means
        assert table.column("audio_std").to_pylist() == shard.audio_stds
        assert shard.text_lengths == [len(t) for t in table.column("text").to_pylist()]
        assert table.column("speaker").null_count == table.num_rows
        ids += shard.ids
        audio += [np.asarray(a, np.float32) for a in table.column("audio").to_pylist()]
    # Full batches whatever the clip lengths; only the writer's last one may be short.
    assert batch_rows[:-1] == [8] * (len(batch_rows) - 1) and sum(batch_rows) == len(clips)
    assert ids == [f"u{index}" for index in range(len(clips))]
    means = [m for shard in shards for m in shard.audio_means]
    stds = [s for shard in shards for s in shard.audio_stds]
    for clip, stored, mean, std in zip(clips, audio, means, stds, strict=True):
        np.testing.assert_array_equal(stored, clip)
        # A float32 sum: the mean to 1e-6 of the signal's RMS, DC offset included.
        rms = float(np.sqrt(np.mean(clip.astype(np.float64) ** 2)))
        assert mean == pytest.approx(clip.mean(dtype=np.float64), abs=1e-6 * rms)
        assert std == pytest.approx(clip.std(dtype=np.float64), rel=1e-5)


def test_audio_statistics_match_float64_and_refuse_non_finite_audio():
    rng = np.random.default_rng(1)
    speech = (0.05 * rng.standard_normal(80_000)).astype(np.float32)
    offset = (0.5 + 1e-3 * rng.standard_normal(3_000)).astype(np.float32)
    # Finite, but their squares overflow float32: the exact float64 path.
    loud = np.full(1_000, 3e19, np.float32)
    loud[::2] = -3e19
    for clip in (speech, offset, loud):
        mean, std = shard_format.audio_statistics(clip)
        wide = clip.astype(np.float64)
        assert mean == pytest.approx(wide.mean(), abs=1e-6 * np.sqrt(np.mean(wide**2)))
        assert std == pytest.approx(wide.std(), rel=1e-6)
    for bad in (np.nan, np.inf, -np.inf):
        clip = speech.copy()
        clip[1234] = bad
        assert shard_format.audio_statistics(clip) is None


def test_batches_stop_short_of_max_batch_bytes(tmp_path: Path):
    """Long clips end a batch early, so the writer's buffer stays bounded; a clip longer than
    the bound is a batch of its own."""
    lengths = [10_000, 10_000, 10_000, 40_000, 5_000, 5_000, 5_000, 5_000, 5_000]
    clips = [np.full(n, 0.1 * i, np.float32) for i, n in enumerate(lengths)]
    writer = shard_format.ShardWriter(
        str(tmp_path), "shard-b", shard_format.shard_schema([]), 10**9, 8, max_batch_bytes=100_000
    )
    for index, clip in enumerate(clips):
        row = {"id": f"u{index}", "text": "a", "sentence": "A"}
        writer.add(row, clip, *shard_format.audio_statistics(clip))
    (shard,) = writer.close()
    reader = ipc.open_file(pa.memory_map(str(tmp_path / shard.name)))
    batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    assert [batch.num_rows for batch in batches] == [2, 1, 1, 5]
    audio = [np.asarray(a, np.float32) for b in batches for a in b.column("audio").to_pylist()]
    for clip, stored in zip(clips, audio, strict=True):
        np.testing.assert_array_equal(stored, clip)
