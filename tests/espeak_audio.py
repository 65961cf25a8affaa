"""German speech files made with espeak-ng, at any rate, channel count and format."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import soundfile
import soxr

REPO_ROOT = Path(__file__).resolve().parents[1]


def speak(text: str, path: Path, sampling_rate: int, channels: int = 1, **write_args) -> np.ndarray:
    """German espeak-ng speech written at `sampling_rate`; returns the samples written."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "de", "-b", "1", "--stdout", text], check=True, capture_output=True
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    samples = soxr.resample(samples, rate, sampling_rate)
    if channels > 1:
        # Different gains per channel, so a wrong downmix shows.
        samples = np.stack([samples * (0.5 + 0.5 * c / channels) for c in range(channels)], axis=1)
    soundfile.write(path, samples, sampling_rate, **write_args)
    return samples
