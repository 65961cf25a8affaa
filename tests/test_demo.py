"""The README's first command, on its smallest setting: generate, preprocess, train, transcribe."""

from __future__ import annotations

import json
import subprocess
import sys

from espeak_audio import REPO_ROOT


def test_demo_runs_the_whole_pipeline(tmp_path):
    command = [
        sys.executable, "-m", "train.demo", "--output_dir", str(tmp_path),
        "--hours", "0.03", "--max_steps", "6", "--eval_steps", "3", "--num_cpus", "2",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[demo] test clip transcript:" in result.stdout
    dataset = json.loads((tmp_path / "data" / "train" / "dataset.json").read_text())
    assert dataset["counts"]["accepted"] > 0 and dataset["counts"]["rejected"] == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()

    # A second run reuses everything and says so: the corpus, the data and the trained model.
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to do" in again.stdout
