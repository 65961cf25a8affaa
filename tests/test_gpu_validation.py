"""The GPU validation starts and finishes on CPU (--dry_run), and its GPU side imports lightly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.benchmark_results import REPO_ROOT
from benchmarks.gpu_validation import SYSTEMS

# What the GPU machine lacks: importing the validation or collecting tests/gpu must not need it.
ABSENT_ON_GPU_MACHINE = ("ray", "soundfile", "soxr", "librosa", "datasets", "matplotlib")


def test_dry_run_measures_both_systems_and_skips_the_gpu_tests(tmp_path) -> None:
    command = [sys.executable, "-m", "benchmarks.gpu_validation", "--dry_run"]
    command += ["--output_dir", str(tmp_path), "--work_dir", str(tmp_path / "work")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    document = json.loads((tmp_path / "gpu_validation-quick.json").read_text(encoding="utf-8"))
    assert document["quick"] is True and "--dry_run" in document["command_line"]
    details = document["details"]
    assert details["device"]["kind"] == "cpu"
    assert all(document["machine"]["packages"][p] for p in ("torch", "transformers", "deepspeed"))
    tests = details["tests"]
    assert tests["returncode"] == 0 and not tests["timed_out"]
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    dataset = details["dataset"]
    assert dataset["clips"] > 0 and dataset["hf_per_device_train_batch_size"] > 0

    (preset,) = details["runs"]
    for system in SYSTEMS:
        run = details["runs"][preset][system]
        assert run["ok"], run.get("error")
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
