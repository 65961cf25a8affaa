"""The startup and training-throughput benchmarks run end to end (--quick) and write sane JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from benchmark_checks import assert_rows, corpus_clips_and_seconds, resampled_seconds

from benchmarks import harness, hf_trainer_baseline, startup_time, training_throughput
from preprocess.shard_format import ShardDataset

ROW_KEYS = {"metric", "ours", "baseline", "baseline_name", "ratio", "unit", "higher_is_better"}
OURS_PHASES = [
    "imports",
    "distributed_init",
    "dataset_open_and_batch_plan",
    "model_build",
    "deepspeed_initialize",
    "first_batch",
    "first_optimizer_step",
]
HF_PHASES = [
    "imports",
    "load_dataset",
    "text_and_vocab",
    "map_decode_resample_features",
    "model_build",
    "trainer_init",
    "train_begin",
    "first_optimizer_step",
]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared, so the --quick corpus and its dataset are made once for both benchmarks."""
    return tmp_path_factory.mktemp("benchmark-training-work")


def read_quick_result(output_dir: Path, name: str) -> dict[str, Any]:
    """The --quick result: schema-conforming rows with positive figures, a plot beside it."""
    document = json.loads((output_dir / f"{name}-quick.json").read_text(encoding="utf-8"))
    assert document["benchmark"] == name and document["quick"] is True
    assert (output_dir / document["plot"]).stat().st_size > 0
    assert document["machine"]["cores"] >= 1
    for row in document["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["ours"] > 0 and row["baseline"] > 0
    return document


@pytest.mark.parametrize("module", [startup_time, training_throughput, hf_trainer_baseline])
def test_help(module, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m benchmarks." in capsys.readouterr().out


def test_startup_time_quick(tmp_path, work_dir) -> None:
    argv = ["--quick", "--num_cpus", "2", "--work_dir", str(work_dir)]
    assert startup_time.main([*argv, "--output_dir", str(tmp_path)]) == 0

    document = read_quick_result(tmp_path, "startup_time")
    systems = startup_time.SYSTEMS
    headline_rows = [row for row in document["rows"] if row["headline"]]
    planning_name = "HF LengthGroupedSampler, batch size "
    assert [row["baseline_name"] for row in headline_rows][:3] == [
        systems["hf_cold"],
        systems["hf_warm"],
        systems["hf_torchrun"],
    ]
    (size,) = document["details"]["sizes"]
    clips, corpus_seconds = corpus_clips_and_seconds(work_dir, 0.02, 0.02)
    assert size["hours"] == 0.02 and size["clips"] == clips
    assert size["audio_hours"] * 3600 == resampled_seconds(clips, corpus_seconds)
    # Preprocessing as long as the dataset's own history says its runs took.
    dataset_json = work_dir / "dataset-corpus-0.02h-unique0.02h-seed0" / "dataset.json"
    preprocess_runs = json.loads(dataset_json.read_text(encoding="utf-8"))["runs"]
    assert size["preprocess_seconds_not_counted"] > 0
    assert size["preprocess_seconds_not_counted"] == pytest.approx(
        sum(run["wall_seconds"] for run in preprocess_runs)
    )
    phases = {"ours": OURS_PHASES, "hf_cold": HF_PHASES, "hf_warm": HF_PHASES}
    # The launcher commands are timed from launch: their first phase is the launcher's own.
    phases |= {"ours_launcher": ["launcher", *OURS_PHASES], "hf_torchrun": ["launcher", *HF_PHASES]}
    assert list(size["runs"]) == list(systems)
    for system, expected_phases in phases.items():
        (run,) = size["runs"][system]
        assert list(run["phases"]) == expected_phases
        assert all(seconds >= 0 for seconds in run["phases"].values())
        assert run["total"] == pytest.approx(sum(run["phases"].values()))
        assert run["total"] > 0
        # The phases start at process creation or launch, a moment after Popen; exit comes after.
        assert run["wall_seconds"] > run["total"] - 0.5
    # Going through a launcher costs something.
    assert size["runs"]["ours_launcher"][0]["phases"]["launcher"] > 0
    assert size["runs"]["hf_torchrun"][0]["phases"]["launcher"] > 0
    cold, warm, torchrun = (
        size["runs"][system][0] for system in ("hf_cold", "hf_warm", "hf_torchrun")
    )
    # The warm runs found everything the cold one wrote; the HF side trained on the same audio.
    assert cold["cache_arrow_files_written"] > 0
    assert warm["cache_arrow_files_written"] == torchrun["cache_arrow_files_written"] == 0
    for run in (cold, warm, torchrun):
        assert run["rows"] == size["clips"]
        assert run["audio_hours"] == pytest.approx(size["audio_hours"], rel=1e-3)

    planning = document["details"]["planning"]
    assert planning["utterances"] == 200_000 and planning["ranks"] == 64
    for side in ("ours", "hf"):
        assert planning[side]["seconds"] > 0 and planning[side]["peak_extra_gib"] >= 0

    # The table from the phases each run recorded, the fastest round of each system.
    total = {
        system: min(sum(run["phases"].values()) for run in runs)
        for system, runs in size["runs"].items()
    }
    metric = "launch to first optimizer step, 0.02 h corpus"
    launcher = "launcher command to first optimizer step, 0.02 h corpus"
    first_launch = "first launch incl. ours' one-off preprocessing, 0.02 h corpus"
    where = f"{planning['hours']:,.0f} h (0.2 M utterances), 64 ranks"
    planning_anchor = planning_name + str(planning["hf_batch_size"])
    assert_rows(
        document,
        {
            (metric, systems["hf_cold"]): (total["ours"], total["hf_cold"]),
            (metric, systems["hf_warm"]): (total["ours"], total["hf_warm"]),
            (launcher, systems["hf_torchrun"]): (total["ours_launcher"], total["hf_torchrun"]),
            (first_launch, systems["hf_cold"]): (
                total["ours"] + size["preprocess_seconds_not_counted"],
                total["hf_cold"],
            ),
            (f"batch planning, {where}", planning_anchor): (
                planning["ours"]["seconds"],
                planning["hf"]["seconds"],
            ),
            (f"peak extra memory of batch planning, {where}", planning_anchor): (
                planning["ours"]["peak_extra_gib"],
                planning["hf"]["peak_extra_gib"],
            ),
        },
    )


def test_training_throughput_quick(tmp_path, work_dir) -> None:
    argv = ["--quick", "--num_cpus", "2", "--work_dir", str(work_dir)]
    assert training_throughput.main([*argv, "--output_dir", str(tmp_path)]) == 0

    document = read_quick_result(tmp_path, "training_throughput")
    details = {**document["settings"], **document["details"]}
    assert details["device"]["kind"] in ("cpu", "cuda") and details["device"]["name"]
    runs = details["runs"]
    assert [(run["preset"], run["stage"]) for run in runs] == [("tiny", 2), ("tiny", 3)]
    dataset = ShardDataset(details["dataset"])
    longest_clip = float(dataset.audio_lengths.max()) / dataset.sampling_rate
    audio_per_step = {}
    for run in runs:
        assert run["ok"], run.get("error")
        run["steps"] = [record for record in run["records"] if "loss" in record]
        # Every step is logged: the warm-up step, then the measured ones.
        assert [record["step"] for record in run["steps"]] == [1, 2, 3]
        assert run["measured_steps"] == details["steps"] == 2
        audio_per_step[run["stage"]] = [
            record["audio_seconds_per_second"] * record["step_time"] for record in run["steps"]
        ]
        for audio, record in zip(audio_per_step[run["stage"]], run["steps"], strict=True):
            # Each rank's micro-batch holds at most --max_batch_seconds of padded audio, unless
            # one clip alone is longer (float rounding aside).
            padded = audio / (1 - record["padding_fraction"])
            budget = details["num_ranks"] * max(run["max_batch_seconds"], longest_clip)
            assert 0 < audio <= padded <= budget * (1 + 1e-9)
        measured = run["steps"][details["warmup_steps"] :]
        step_times = [record["step_time"] for record in measured]
        measured_audio = audio_per_step[run["stage"]][details["warmup_steps"] :]
        assert run["audio_seconds_per_second"] == pytest.approx(
            sum(measured_audio) / sum(step_times)
        )
        assert run["median_step_time"] == pytest.approx(statistics.median(step_times))
        assert run["all_losses_finite"] and 0 <= run["mean_padding_fraction"] < 1
        assert 0 < run["startup_seconds"] < run["wall_seconds"]
    # Both stages trained on the same batches, so their speeds compare like with like.
    assert audio_per_step[3] == pytest.approx(audio_per_step[2])

    zero2, zero3 = runs
    ranks = (
        f"{details['num_ranks']} {'GPU' if details['device']['kind'] == 'cuda' else 'CPU'} ranks"
    )
    baseline_name = "ZeRO-2, same model and precision"
    assert_rows(
        document,
        {
            (f"training speed, tiny, ZeRO-3, bf16, 8 s batches, {ranks}", baseline_name): (
                zero3["audio_seconds_per_second"],
                zero2["audio_seconds_per_second"],
            ),
            (f"median step time, tiny, ZeRO-3, bf16, {ranks}", baseline_name): (
                zero3["median_step_time"],
                zero2["median_step_time"],
            ),
        },
    )
    (headline,) = [row for row in document["rows"] if row["headline"]]
    assert "ZeRO-3" in headline["metric"] and headline["higher_is_better"] is True


def test_step_statistics_weighs_steps_by_their_time() -> None:
    records = [
        {"step": 1, "loss": 9.0, "audio_seconds_per_second": 1.0, "step_time": 50.0},
        {"step": 2, "loss": 5.0, "audio_seconds_per_second": 10.0, "step_time": 1.0},
        {"step": 3, "loss": 4.0, "audio_seconds_per_second": 30.0, "step_time": 3.0},
        {"step": 3, "eval_wer": 0.9},
    ]
    for record in records[:3]:
        record["padding_fraction"] = 0.1
    statistics = harness.step_statistics(records, warmup_steps=1)
    assert statistics["measured_steps"] == 2
    assert statistics["audio_seconds_per_second"] == pytest.approx((10 + 90) / 4)
    assert statistics["median_step_time"] == pytest.approx(2.0)
    with pytest.raises(RuntimeError):
        harness.step_statistics(records, warmup_steps=3)


def test_training_throughput_rejects_mismatched_batch_budgets(tmp_path) -> None:
    argv = ["--presets", "tiny", "base", "--max_batch_seconds", "1", "2", "3"]
    with pytest.raises(SystemExit):
        training_throughput.main([*argv, "--output_dir", str(tmp_path)])
