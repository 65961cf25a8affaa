"""The tiny model, trained for a few minutes on generated German speech, learns to transcribe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from espeak_audio import REPO_ROOT


@pytest.mark.slow
def test_demo_training_brings_held_out_cer_down(tmp_path):
    # The README's demo at its default settings: 1 h of speech, 750 steps on 2 CPU ranks.
    command = [sys.executable, "-m", "train.demo", "--output_dir", str(tmp_path), "--num_cpus", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evaluations = [r for r in map(json.loads, metrics) if "eval_cer" in r]
    first, last = evaluations[0], evaluations[-1]
    # Measured here with the 1 h corpus (random-init tiny preset, encoder trained, 2 CPU ranks),
    # dev CER at steps 200/400/600/800: 1.00/0.54/0.28/0.235 and 1.00/0.64/0.30/0.25 in two
    # runs, and 0.98/0.39/0.26 at 250/500/750 with these defaults (the whole demo in 9.9 min).
    # How long the model stays in CTC's all-blank stage varies by a couple of hundred steps
    # between runs, hence the margin over the 0.30 goal.
    assert last["step"] == 750
    assert last["eval_cer"] < 0.40
    assert last["eval_cer"] < first["eval_cer"] - 0.25
    transcript = result.stdout.split("[demo] test clip transcript:")[1].splitlines()[0].strip()
    assert transcript, "the trained model transcribes the held-out test clip as nothing"
