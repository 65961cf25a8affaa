"""Every benchmark runs end to end on a tiny corpus and writes sane JSON; the table renders it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import (
    batching_padding,
    loader_throughput,
    preprocess_throughput,
    update_readme_table,
)

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
NO_RETRIES = ["--retries", "0"]
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
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
    return document


@pytest.mark.parametrize(
    "module", [preprocess_throughput, batching_padding, loader_throughput, update_readme_table]
)
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m benchmarks." in capsys.readouterr().out


def test_preprocess_throughput(tmp_path, work_dir) -> None:
    argv = ["--hours", "0.01", *TINY_CORPUS, *RAY_OPTIONS, *NO_RETRIES, "--work_dir", str(work_dir)]
    assert preprocess_throughput.main([*argv, "--output_dir", str(tmp_path)]) == 0

    document = read_result(tmp_path, "preprocess_throughput")
    (size,) = document["details"]["sizes"]
    assert size["ours"]["accepted"] == size["rows"] and size["ours"]["rejected"] == 0
    # Every system decoded the same audio (resampler lengths may differ by a sample per clip).
    audio = size["limit_before"]["audio_seconds"]
    for system in ("ours", "hf"):
        assert size[system]["audio_seconds"] == pytest.approx(audio, rel=1e-4)
        memory = size[system]["memory"]
        # A whole Python process tree takes more than 50 MB and this one far less than 8 GB.
        assert 0.05 < memory["peak_pss_gib"] <= memory["peak_rss_gib"] < 8
        assert memory["samples"] > 1
        assert size[system]["attempt_disturbances"] == [size[system]["disturbance"]]
    assert size["ours"]["memory"]["peak_processes"] > 3  # driver, gcs, raylet, workers
    assert size["hf"]["memory"]["cpu_seconds_by_kind"]["forks of the driver"] > 0
    metrics = {(row["metric"], row["baseline_name"]) for row in document["rows"]}
    assert len(metrics) == len(document["rows"]) == 4


def test_batching_padding(tmp_path, work_dir) -> None:
    argv = ["--corpus_hours", "0.3", "--corpus_unique_hours", "0.03", "--cv_utterances", "2000"]
    argv += ["--epochs", "1", "--work_dir", str(work_dir), "--output_dir", str(tmp_path)]
    assert batching_padding.main(argv) == 0

    document = read_result(tmp_path, "batching_padding")
    distributions = document["details"]["distributions"]
    assert set(distributions) == {"demo corpus", "Common Voice-like"}
    cv_summary = distributions["Common Voice-like"]["summary"]
    assert 4 < cv_summary["p50_seconds"] < 5 and cv_summary["max_seconds"] <= 10
    for distribution in distributions.values():
        for comparison in distribution["budgets"]:
            budget = comparison["budget_seconds"]
            ours, random = comparison["ours"], comparison["random"]
            assert ours["max_padded_seconds"] <= budget
            assert random["max_padded_seconds"] <= budget
            assert comparison["hf_memory_safe"]["max_padded_seconds"] <= budget
            assert comparison["hf_mean_matched"]["mean_padded_seconds"] <= budget
            assert ours["padding_percent"] < random["padding_percent"]
            assert ours["batches"] <= comparison["hf_memory_safe"]["batches"]


def test_loader_throughput(tmp_path, work_dir) -> None:
    argv = ["--hours", "0.01", *TINY_CORPUS, *RAY_OPTIONS, *NO_RETRIES, "--work_dir", str(work_dir)]
    argv += ["--num_workers", "0", "1", "--epochs", "1", "--output_dir", str(tmp_path)]
    assert loader_throughput.main(argv) == 0

    document = read_result(tmp_path, "loader_throughput")
    details = document["details"]
    assert [loader["num_workers"] for loader in details["loaders"]] == [0, 1]
    for loader in details["loaders"]:
        assert loader["audio_seconds"] == pytest.approx(details["copy_bound"]["audio_seconds"])
        assert 0 < loader["first_batch_seconds"] <= loader["seconds"]
        # Collating (normalizing, padding, labels) cannot beat copying the samples alone.
        assert (
            loader["audio_seconds_per_second"] < details["copy_bound"]["audio_seconds_per_second"]
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
    # Sparse rows are rendered with placeholders; lower-is-better ratios below 1 are leads.
    write_json(
        results / "startup.json",
        {"rows": [{"metric": "startup", "ours": 2.0, "baseline": 4.0, "higher_is_better": False}]},
    )
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
