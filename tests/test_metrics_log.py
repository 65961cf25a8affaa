"""The run's logs: the metrics file, and the batch trace each rank appends to."""

from __future__ import annotations

import json

from train.metrics_log import BatchTrace, MetricsLog


def test_records_append_as_json_lines_on_the_main_rank_only(tmp_path):
    MetricsLog(str(tmp_path), enabled=True).write({"step": 1, "loss": 2.5})
    MetricsLog(str(tmp_path), enabled=True).write({"step": 2, "loss": 2.0, "note": "resumed"})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert any(path.name.startswith("events") for path in (tmp_path / "tensorboard").iterdir())
    other = tmp_path / "other_rank"
    other.mkdir()
    MetricsLog(str(other), enabled=False).write({"step": 1, "loss": 2.5})
    assert list(other.iterdir()) == []


def test_the_batch_trace_appends_each_micro_batch_across_resumes(tmp_path):
    BatchTrace(str(tmp_path), rank=1, enabled=True).write(1, 0, 0, ["a", "b"])
    resumed = BatchTrace(str(tmp_path), rank=1, enabled=True)
    resumed.write(2, 1, 0, ["c"])  # line-buffered: on disk before anything closes it
    lines = (tmp_path / "batch_trace" / "rank1.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "micro_step": 0, "epoch": 0, "ids": ["a", "b"]},
        {"step": 2, "micro_step": 1, "epoch": 0, "ids": ["c"]},
    ]
    off = tmp_path / "off"
    off.mkdir()
    BatchTrace(str(off), rank=0, enabled=False).write(1, 0, 0, ["a"])
    assert list(off.iterdir()) == []
