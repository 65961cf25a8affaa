"""Every benchmark runs end to end on a tiny corpus and writes sane JSON; the table renders it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_checks import assert_rows, corpus_clips_and_seconds, resampled_seconds

from argument_classes import PreprocessArguments
from benchmarks import (
    batching_padding,
    loader_throughput,
    preprocess_throughput,
    update_readme_table,
)
from preprocess.prepare_dataset import task_rows
from preprocess.shard_format import ShardDataset
from train.duration_bucket_sampler import DurationBucketSampler

ROW_KEYS = {
    "metric",
    "ours",
    "baseline",
    "baseline_name",
    "ratio",
    "unit",
    "higher_is_better",
    "headline",
}
# What the conftest's ray_local fixture uses: Ray in tests gets 2 CPUs and a small object store.
RAY_OPTIONS = ["--num_cpus", "2", "--object_store_memory", str(150 * 1024**2)]
# Tests check plumbing, not timings: never rerun a measurement because the machine is busy.
NO_RETRIES = ["--repeats", "1"]
TINY_CORPUS = ["--unique_hours", "0.01"]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the benchmarks so the 0.01 h demo corpus is synthesized only once."""
    return tmp_path_factory.mktemp("benchmark-work")


def read_result(output_dir: Path, name: str) -> dict:
    document = json.loads((output_dir / f"{name}.json").read_text(encoding="utf-8"))
    assert (output_dir / f"{name}.png").stat().st_size > 0
    assert document["benchmark"] == name and document["plot"] == f"{name}.png"
    assert document["machine"]["cores"] >= 1 and document["machine"]["ram_gib"] > 0
    assert document["command_line"].startswith(f"python -m benchmarks.{name} ")
    assert document["rows"]
    for row in document["rows"]:
        assert set(row) == ROW_KEYS
        assert row["ours"] > 0 and row["baseline"] > 0
    return document


@pytest.mark.parametrize(
    "module", [preprocess_throughput, batching_padding, loader_throughput, update_readme_table]
)
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m benchmarks." in capsys.readouterr().out


def speed_of(run: dict) -> float:
    return run["audio_seconds"] / run["seconds"]


@pytest.mark.parametrize(("repeats", "runs"), [(1, (1, 1)), (2, (1, 1)), (3, (1, 2)), (4, (2, 2))])
def test_limit_runs_as_many_as_a_system_gets(repeats, runs) -> None:
    assert preprocess_throughput.limit_runs(repeats) == runs


def test_preprocess_throughput(tmp_path, work_dir) -> None:
    argv = ["--hours", "0.01", "0.02", *TINY_CORPUS, *RAY_OPTIONS, *NO_RETRIES]
    argv += ["--short_clip_hours", "0.01", "0.02", "--short_clip_words", "3"]
    argv += ["--work_dir", str(work_dir), "--output_dir", str(tmp_path)]
    assert preprocess_throughput.main(argv) == 0

    document = read_result(tmp_path, "preprocess_throughput")
    sizes = document["details"]["sizes"]
    assert [(size["hours"], size["max_words"]) for size in sizes] == [
        (0.01, None), (0.02, None), (0.01, 3), (0.02, 3)
    ]  # fmt: skip
    limit_name = "decode+resample limit (2 processes)"
    write_name = "decode+resample+write limit (2 processes)"
    hf_name = "HF datasets 3.6 map(num_proc)"
    expected = {}
    for size in sizes:
        short = size["max_words"] is not None
        clips, seconds = corpus_clips_and_seconds(work_dir, size["hours"], 0.01, size["max_words"])
        assert size["rows"] == clips
        assert size["ours"]["accepted"] == clips and size["ours"]["rejected"] == 0
        limits = ("limit_before", "limit_after", "write_limit_before", "write_limit_after")
        systems = ("ours", *limits) + (() if short else ("hf", "hf_first"))
        # HF runs on Common Voice-like corpora only: its first run and its warm repeats.
        assert short == ("hf" not in size) == ("hf_first" not in size)
        # Every system decoded all of the corpus, as long as its file headers say it is.
        for system in systems:
            assert size[system]["audio_seconds"] == resampled_seconds(clips, seconds)
        assert size["mean_clip_seconds"] == pytest.approx(
            size["limit_after"]["audio_seconds"] / clips
        )
        # The limits ran as 2 processes, one share each, both within its wall time; only the
        # write limit wrote shards, and left none behind.
        for name in limits:
            limit = size[name]
            assert limit["processes"] == 2 and len(limit["share_seconds"]) == 2
            assert 0 < max(limit["share_seconds"]) <= limit["seconds"]
            assert limit["writes_shards"] == name.startswith("write_limit")
        assert not list(work_dir.glob("output-limit-*"))
        for system in (s for s in systems if s not in limits):
            memory = size[system]["memory"]
            # A whole Python process tree takes more than 50 MB and this one far less than 8 GB.
            assert 0.05 < memory["peak_pss_gib"] <= memory["peak_rss_gib"] < 8
            assert memory["samples"] > 1
            assert size[system]["attempt_disturbances"] == [size[system]["disturbance"]]
        ours = size["ours"]
        assert ours["memory"]["peak_processes"] > 3  # driver, gcs, raylet, workers
        groups = set(ours["memory"]["cpu_seconds_by_kind"])
        # Ray Data's two actors are told apart from the workers they start as.
        assert {"driver", "ray workers", "Ray Data actors", "raylet", "GCS"} <= groups
        # Every process in a named group (a child caught between its fork and exec is a fork).
        named = {"driver", "ray workers", "Ray Data actors", "raylet", "GCS"}
        named |= {"dashboard", "other Ray daemons"}
        assert groups <= named | {"forks of the driver", "exited before it was named"}
        # The machine's capacity, split into the groups, idle and other work, adds up (but for
        # the sampler's own share).
        assert sum(ours["cpu_share_by_group"].values()) == pytest.approx(1, abs=0.05)

        # The table from the raw audio seconds and wall seconds; the limit is the faster run.
        limit = max(speed_of(m) for m in (size["limit_before"], size["limit_after"]))
        speed = ours["audio_seconds"] / ours["seconds"]
        # What the CLI's user waits for: Ray's start and shutdown too, each measured.
        assert ours["ray_start_seconds"] > 0 and ours["ray_shutdown_seconds"] > 0
        whole = ours["ray_start_seconds"] + ours["seconds"] + ours["ray_shutdown_seconds"]
        with_ray = ours["audio_seconds"] / whole
        where = f"{size['hours']:g} h corpus{', short clips' if short else ''}, 2 cores"
        expected[(f"preprocessing speed, {where}", limit_name)] = (speed, limit)
        # The pipeline apart, against the faster write limit: its tasks' CPU per audio hour,
        # and their share of the CPUs' time after Ray's start (each limit process is busy
        # from the common start to its own end).
        writer = max((size["write_limit_before"], size["write_limit_after"]), key=speed_of)
        rows_per_task = task_rows(clips, 2, PreprocessArguments.rows_per_task)
        assert ours["tasks"] == math.ceil(clips / rows_per_task) and ours["cpus"] == 2
        assert 0 < ours["task_seconds"] <= 2 * ours["pipeline_seconds"]
        expected[(f"CPU time per audio hour in the decode+write tasks, {where}", write_name)] = (
            ours["task_cpu_seconds"] / ours["audio_seconds"] * 3600,
            writer["cpu_seconds"] / writer["audio_seconds"] * 3600,
        )
        expected[(f"CPUs' time in decode+write tasks, after Ray's start, {where}", write_name)] = (
            100 * ours["task_seconds"] / (2 * ours["pipeline_seconds"]),
            100 * sum(writer["share_seconds"]) / (2 * writer["seconds"]),
        )
        if not short:
            hf, first = size["hf"], size["hf_first"]
            assert hf["memory"]["cpu_seconds_by_kind"]["forks of the driver"] > 0
            expected |= {
                (f"preprocessing speed incl. Ray start and shutdown, {where}", hf_name): (
                    with_ray,
                    hf["audio_seconds"] / hf["seconds"],
                ),
                (
                    f"preprocessing speed incl. Ray start and shutdown, {where}",
                    f"{hf_name}, its first run",
                ): (
                    with_ray,
                    first["audio_seconds"] / first["seconds"],
                ),
                (f"peak memory of all processes (PSS), {where}", hf_name): (
                    ours["memory"]["peak_pss_gib"],
                    hf["memory"]["peak_pss_gib"],
                ),
            }
    small, large = (size["ours"]["memory"]["peak_pss_gib"] for size in sizes[:2])
    expected[("peak memory (PSS) at 0.02 h, 2 cores", "ours at 0.01 h")] = (large, small)
    # Steady state per clip kind: seconds = fixed + audio / rate through the two sizes, where
    # the larger took longer; the fixed cost (Ray start and shutdown included) against HF's,
    # fitted alike.
    for pair, clips in ((sizes[:2], "Common Voice-like"), (sizes[2:], "short")):
        (audio_small, audio_large), (seconds_small, seconds_large) = (
            [size["ours"][key] for size in pair] for key in ("audio_seconds", "seconds")
        )
        if seconds_large <= seconds_small:
            assert "steady_state" not in pair[1]
            continue
        rate = (audio_large - audio_small) / (seconds_large - seconds_small)
        ray_start, ray_shutdown = (
            sum(size["ours"][key] for size in pair) / 2
            for key in ("ray_start_seconds", "ray_shutdown_seconds")
        )
        fixed = ray_start + seconds_small - audio_small / rate + ray_shutdown
        assert pair[1]["steady_state"]["x_real_time"] == pytest.approx(rate)
        assert pair[1]["steady_state"]["fixed_seconds"] == pytest.approx(fixed)
        span = f"({pair[1]['mean_clip_seconds']:.1f} s mean), 0.01 h to 0.02 h, 2 cores"
        steady = f"preprocessing speed in steady state, {clips} clips {span}"
        expected[(steady, limit_name)] = (rate, pair[1]["limit"]["x_real_time"])
        writing = max(
            speed_of(m) for m in (pair[1]["write_limit_before"], pair[1]["write_limit_after"])
        )
        expected[(steady, write_name)] = (rate, writing)
        hf_seconds = [size["hf"]["seconds"] for size in pair] if clips != "short" else None
        if hf_seconds and hf_seconds[1] > hf_seconds[0]:
            hf_audio = [size["hf"]["audio_seconds"] for size in pair]
            hf_rate = (hf_audio[1] - hf_audio[0]) / (hf_seconds[1] - hf_seconds[0])
            metric = f"fixed cost of a run (Ray start and shutdown included), {clips} clips {span}"
            expected[(metric, hf_name)] = (fixed, hf_seconds[0] - hf_audio[0] / hf_rate)
    assert_rows(document, expected)


def test_batching_padding(tmp_path, work_dir) -> None:
    argv = ["--hours", "0.3", "--unique_hours", "0.03", "--cv_utterances", "2000"]
    argv += ["--epochs", "1", "--work_dir", str(work_dir), "--output_dir", str(tmp_path)]
    assert batching_padding.main(argv) == 0

    document = read_result(tmp_path, "batching_padding")
    distributions = document["details"]["distributions"]
    assert set(distributions) == {"demo corpus", "Common Voice-like"}
    cv_summary = distributions["Common Voice-like"]["summary"]
    assert 4 < cv_summary["p50_seconds"] < 5 and cv_summary["max_seconds"] <= 10
    assert cv_summary["utterances"] == 2000
    clips, seconds = corpus_clips_and_seconds(work_dir, 0.3, 0.03)
    demo_summary = distributions["demo corpus"]["summary"]
    assert demo_summary["utterances"] == clips
    assert demo_summary["hours"] * 3600 == resampled_seconds(clips, seconds)

    expected_rows: dict[tuple[str, str], tuple[float, float]] = {}
    for name, distribution in distributions.items():
        summary = distribution["summary"]
        assert [c["budget_seconds"] for c in distribution["budgets"]] == [100, 200]
        for comparison in distribution["budgets"]:
            budget = comparison["budget_seconds"]
            for method in batching_padding.METHODS:
                statistics = comparison[method]
                # One epoch batches every utterance once: the real audio in its batches is all
                # of the distribution's, so the padding follows from the padded seconds alone.
                padded = statistics["mean_padded_seconds"] * statistics["batches"]
                real = summary["hours"] * 3600
                assert statistics["padding_percent"] == pytest.approx(100 * (1 - real / padded))
            for method in ("hf_mean_matched", "hf_memory_safe"):
                batch_size = comparison[method]["batch_size"]
                assert comparison[method]["batches"] == math.ceil(
                    summary["utterances"] / batch_size
                )
            ours, random = comparison["ours"], comparison["random"]
            matched, safe = comparison["hf_mean_matched"], comparison["hf_memory_safe"]
            labels = batching_padding.METHOD_LABELS
            where = f"{name}, {budget:g} s padded per batch"
            expected_rows |= {
                (f"padding, {where}", labels["random"]): (
                    ours["padding_percent"],
                    random["padding_percent"],
                ),
                (f"padding, {where}", labels["hf_mean_matched"]): (
                    ours["padding_percent"],
                    matched["padding_percent"],
                ),
                (f"largest batch (peak memory), {where}", labels["hf_mean_matched"]): (
                    ours["max_padded_seconds"],
                    matched["max_padded_seconds"],
                ),
                (f"batches per epoch, {where}", labels["hf_memory_safe"]): (
                    ours["batches"],
                    safe["batches"],
                ),
            }
            assert ours["max_padded_seconds"] <= budget
            assert random["max_padded_seconds"] <= budget
            assert comparison["hf_memory_safe"]["max_padded_seconds"] <= budget
            assert comparison["hf_mean_matched"]["mean_padded_seconds"] <= budget
            assert ours["padding_percent"] < random["padding_percent"]
            assert ours["batches"] <= comparison["hf_memory_safe"]["batches"]
    assert_rows(document, expected_rows)


def test_loader_throughput(tmp_path, work_dir) -> None:
    argv = ["--hours", "0.01", *TINY_CORPUS, *RAY_OPTIONS, *NO_RETRIES, "--work_dir", str(work_dir)]
    argv += ["--num_workers", "0", "1", "--epochs", "1", "--output_dir", str(tmp_path)]
    assert loader_throughput.main(argv) == 0

    document = read_result(tmp_path, "loader_throughput")
    details = document["details"]
    clips, seconds = corpus_clips_and_seconds(work_dir, 0.01, 0.01)
    assert details["utterances"] == clips
    assert details["dataset_hours"] * 3600 == resampled_seconds(clips, seconds)
    dataset = ShardDataset(str(work_dir / "dataset-corpus-0.01h-unique0.01h-seed0"))
    planned_batches = DurationBucketSampler(
        audio_lengths=dataset.audio_lengths,
        sampling_rate=dataset.sampling_rate,
        max_batch_seconds=100,
        seed=0,
    ).plan_epoch(0)
    copy_bound = details["copy_bound"]
    # The anchor copies into pinned memory where CUDA is, as our loader then pins its batches.
    anchor = loader_throughput.ANCHOR + (", into pinned memory" if details["pinned_memory"] else "")
    # One epoch (--epochs 1) delivers every utterance once, in the sampler's planned batches.
    assert copy_bound["audio_seconds"] == pytest.approx(details["dataset_hours"] * 3600)
    assert [loader["num_workers"] for loader in details["loaders"]] == [0, 1]
    for loader in details["loaders"]:
        assert loader["audio_seconds"] == pytest.approx(details["dataset_hours"] * 3600)
        assert loader["batches"] == len(planned_batches)
        assert 0 < loader["first_batch_seconds"] <= loader["seconds"]
        # Collating (normalizing, padding, labels) cannot beat copying the samples alone.
        assert loader["audio_seconds_per_second"] < copy_bound["audio_seconds_per_second"]
    assert_rows(
        document,
        {
            (
                f"collated audio delivered, num_workers={loader['num_workers']}",
                anchor,
            ): (
                loader["audio_seconds"] / loader["seconds"],
                copy_bound["audio_seconds"] / copy_bound["seconds"],
            )
            for loader in details["loaders"]
        },
    )


def write_json(path: Path, document: object) -> None:
    path.write_text(json.dumps(document), encoding="utf-8")


def test_update_readme_table_renders_any_schema_conforming_result(tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    machine = {"cpu_model": "Test CPU", "cores": 8, "ram_gib": 64.0, "gpu": ["H100, 80 GiB"]}
    row = {
        "metric": "samples per second",
        "ours": 1500.0,
        "baseline": 1000.0,
        "baseline_name": "Trainer | default",
        "ratio": 1.5,
        "unit": "samples/s",
        "higher_is_better": True,
        "headline": True,
    }
    # A benchmark this module has never heard of, with one non-headline row.
    write_json(
        results / "training_throughput.json",
        {
            "benchmark": "training_throughput",
            "machine": machine,
            "rows": [row, {**row, "metric": "detail only", "headline": False}],
        },
    )
    # Without a machine or a unit; lower-is-better ratios below 1 are leads.
    startup = {**row, "metric": "startup", "ours": 2.0, "baseline": 4.0, "ratio": 0.5, "unit": ""}
    write_json(results / "startup.json", {"rows": [{**startup, "higher_is_better": False}]})
    write_json(results / "smoke-quick.json", {"quick": True, "machine": machine, "rows": [row]})
    (results / "broken.json").write_text("{not json", encoding="utf-8")
    write_json(results / "no_rows.json", {"benchmark": "x"})
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\nbefore\n<!-- results:start -->\nstale\n<!-- results:end -->\nafter\n"
    )
    results_md = tmp_path / "RESULTS.md"

    argv = ["--results_dir", str(results), "--results_md", str(results_md), "--readme", str(readme)]
    assert update_readme_table.main(argv) == 0

    page = results_md.read_text(encoding="utf-8")
    assert "| [training_throughput](results/training_throughput.json) |" in page
    assert (
        "1,500 samples/s | 1,000 samples/s | 1.50 (lead) | Test CPU, 8 cores, 64.0 GiB, 1× H100"
        in page
    )
    assert "Trainer \\| default" in page and "detail only" in page
    assert "| 2 | 4 | 0.50 (lead) | ? |" in page
    assert "smoke" not in page and "broken" not in page and "no_rows" not in page

    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nbefore\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\nafter\n")
    assert "stale" not in text and "detail only" not in text
    assert "(results/training_throughput.json)" in text and "[RESULTS.md](RESULTS.md)" in text


def test_update_readme_table_leaves_readme_without_markers_alone(tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# No markers here\n", encoding="utf-8")
    argv = ["--results_dir", str(results), "--results_md", str(tmp_path / "RESULTS.md")]
    assert update_readme_table.main([*argv, "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == "# No markers here\n"
    assert (tmp_path / "RESULTS.md").exists()
