"""The GPU validation runs on CPU (--dry_run) within its deadline, writes what ran and names what
was cut, and its GPU side imports lightly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import gpu_validation
from benchmarks.benchmark_results import REPO_ROOT
from benchmarks.gpu_validation import (
    FINISH_SECONDS,
    MIN_STAGE_SECONDS,
    SYSTEMS,
    Deadline,
    Stages,
)
from benchmarks.harness import RunTimedOut

# What the GPU machine lacks: importing the validation or collecting tests/gpu must not need it.
ABSENT_ON_GPU_MACHINE = ("ray", "soundfile", "soxr", "librosa", "datasets", "matplotlib")


def dry_run(output: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m benchmarks.gpu_validation --dry_run OPTIONS`: the process and its JSON."""
    command = [sys.executable, "-m", "benchmarks.gpu_validation", "--dry_run", *options]
    command += ["--output_dir", str(output), "--work_dir", str(output / "work")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    document = json.loads((output / "gpu_validation-quick.json").read_text(encoding="utf-8"))
    return result, document


def test_dry_run_within_a_generous_deadline_runs_every_stage(tmp_path: Path) -> None:
    result, document = dry_run(tmp_path, "--deadline_s", "600")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert document["quick"] is True and "--dry_run" in document["command_line"]
    details = document["details"]
    assert details["device"]["kind"] == "cpu"
    assert all(document["machine"]["packages"][p] for p in ("torch", "transformers", "deepspeed"))
    names = ["tests/gpu", "dataset", *(f"tiny/{system}" for system in SYSTEMS)]
    assert [(stage["name"], stage["status"]) for stage in details["stages"]] == [
        (name, "ok") for name in names
    ]
    assert details["complete"] is True and details["cut_stages"] == []
    assert details["seconds"] < details["deadline_s"] == 600
    tests = details["tests"]
    assert tests["returncode"] == 0 and not tests["timed_out"] and tests["stopped_in"] is None
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    assert set(tests["outcomes"].values()) == {"SKIPPED"}
    assert len(tests["outcomes"]) == tests["skipped"]
    dataset = details["dataset"]
    assert dataset["clips"] > 0 and dataset["hf_per_device_train_batch_size"] > 0

    (preset,) = details["runs"]
    for system in SYSTEMS:
        run = details["runs"][preset][system]
        assert run["training_flops_per_audio_second"] > 0
        assert run["measured_steps"] == document["settings"]["steps"]
        assert run["audio_seconds_per_second"] > 0 and run["median_step_time"] > 0
        assert run["all_losses_finite"] and 0 <= run["mean_padding_fraction"] < 1
        assert 0 < run["startup_seconds"] < run["wall_seconds"]
        # No GPU: no MFU (fp32 on CPU) and no device memory.
        assert run["mfu"] is None and run["peak_device_memory_gib"] is None
    (speed,) = [row for row in document["rows"] if row["headline"]]
    assert speed["unit"] == "audio s/s" and speed["ours"] > 0 and speed["baseline"] > 0
    assert speed["ratio"] == pytest.approx(speed["ours"] / speed["baseline"])
    assert (tmp_path / document["plot"]).stat().st_size > 0


def test_dry_run_past_its_deadline_writes_what_ran_and_names_what_was_cut(tmp_path: Path) -> None:
    # Less than a trainer run's minimum is left even at the start, and tests/gpu's is larger;
    # the dataset's 10 s are left unless the imports take 19 s.
    deadline = FINISH_SECONDS + MIN_STAGE_SECONDS["run"] - 1
    assert MIN_STAGE_SECONDS["tests"] > MIN_STAGE_SECONDS["run"]
    # A missing wheel folder fails its stage, not the run.
    missing = tmp_path / "gpu_wheels"
    options = ("--deadline_s", str(deadline), "--install_wheels", str(missing))
    result, document = dry_run(tmp_path, *options)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]

    details = document["details"]
    statuses = {stage["name"]: stage["status"] for stage in details["stages"]}
    cut = ["tests/gpu", *(f"tiny/{system}" for system in SYSTEMS)]
    assert statuses == {"install": "failed", "dataset": "ok"} | dict.fromkeys(cut, "cut")
    assert list(statuses) == ["install", "tests/gpu", "dataset", *cut[1:]]
    (install,) = [stage for stage in details["stages"] if stage["name"] == "install"]
    assert install["error"].startswith("FileNotFoundError") and str(missing) in install["error"]
    assert details["cut_stages"] == cut and details["complete"] is False
    assert details["seconds"] < deadline
    assert "tests" not in details and details["runs"] == {} and document["rows"] == []
    assert details["dataset"]["clips"] > 0


def test_stages_record_failures_timeouts_and_cuts_and_save_after_each() -> None:
    now = [0.0]
    deadline = Deadline(started=0.0, seconds=100.0 + FINISH_SECONDS, clock=lambda: now[0])
    saves, limits = [], {}
    stages = Stages(list("abcde"), deadline, lambda: saves.append(len(saves)))

    def work(name: str, seconds: float = 0.0, error: Exception | None = None):
        def stage(limit: float) -> None:
            limits[name] = limit
            now[0] += seconds
            if error is not None:
                raise error

        return stage

    stages.run("a", 10, 50, work("a", seconds=20))
    stages.run("b", 10, 50, work("b", error=ValueError("boom")))
    stages.run("c", 10, 30, work("c", seconds=30, error=RunTimedOut("killed at its limit")))
    stages.run("d", 10, 100, work("d", seconds=45, error=RunTimedOut("killed at the deadline")))
    stages.run("e", 10, 100, work("e"))

    # Each stage gets its cap or what is left, if less (d); e, with 5 s left, is not started.
    assert limits == {"a": 50, "b": 50, "c": 30, "d": 50}
    statuses = [record["status"] for record in stages.records]
    assert statuses == ["ok", "failed", "timed_out", "cut", "cut"]
    assert stages.records[1]["error"] == "ValueError: boom"
    assert stages.records[3]["error"] == "killed at the deadline"
    assert stages.records[4]["reason"] == "5 s left of 10"
    assert [record.get("seconds") for record in stages.records] == [20, 0, 30, 45, None]
    assert stages.named("cut") == ["d", "e"] and saves == [0, 1, 2, 3, 4]


def test_gpu_test_outcomes_survive_a_kill(tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_killed.py").write_text(
        "import os, signal, pytest\n"
        "def test_passes(): pass\n"
        "def test_skips(): pytest.skip('no')\n"
        "def test_killed(): os.kill(os.getpid(), signal.SIGKILL)\n"
        "def test_never_reached(): pass\n",
        encoding="utf-8",
    )
    (tmp_path / "work").mkdir()
    result = gpu_validation.run_gpu_tests(tmp_path / "work", 120, tests)

    assert result["returncode"] == -9 and not result["timed_out"]
    outcomes = {test.split("::")[1]: outcome for test, outcome in result["outcomes"].items()}
    assert outcomes == {"test_passes": "PASSED", "test_skips": "SKIPPED"}
    assert result["stopped_in"].endswith("test_killed.py::test_killed")
    assert (result["passed"], result["skipped"], result["failed"]) == (1, 1, 0)
    with pytest.raises(RuntimeError, match="exit code -9"):
        gpu_validation.raise_for_tests(result, 120)


@pytest.mark.parametrize(
    ("device_name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_peak_flops_by_device(device_name: str, peak: float | None) -> None:
    assert gpu_validation.peak_bf16_flops(device_name) == peak


def test_flops_count_the_feature_encoder_three_times_when_it_trains_once_when_frozen() -> None:
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

    config = Wav2Vec2Config(vocab_size=32)  # wav2vec2-base
    samples = np.array([16_000, 40_000])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for length in samples:
            Wav2Vec2FeatureEncoder(config)(torch.zeros(1, int(length)))
    encoder_forward = counter.get_total_flops() / (samples.sum() / 16_000)

    trained = gpu_validation.training_flops_per_audio_second(config, samples, True)
    frozen = gpu_validation.training_flops_per_audio_second(config, samples, False)
    assert trained - frozen == pytest.approx(2 * encoder_forward, rel=1e-9)


def test_wheels_never_replace_an_installed_package(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pytest==0.0.1\nno-such-package-here==1.0\n", encoding="utf-8")
    missing, kept = gpu_validation.missing_requirements(requirements)
    assert missing == ["no-such-package-here==1.0"]
    assert kept == {"pytest": pytest.__version__}


def test_gpu_side_imports_nothing_the_gpu_machine_lacks() -> None:
    code = (
        "import runpy, sys\n"
        "import benchmarks.gpu_validation\n"
        "for path in ('tests/gpu/conftest.py', 'tests/gpu/test_gpu_training.py'):\n"
        "    runpy.run_path(path)\n"
        f"print(','.join(m for m in {ABSENT_ON_GPU_MACHINE!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ""
