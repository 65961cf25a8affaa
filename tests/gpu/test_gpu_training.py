"""Training on GPUs through the real launcher: NCCL ranks, ZeRO-1/2/3 in bf16 and fp16, export.

Each run is train/run_finetuning.py under `deepspeed.launcher.runner --num_gpus N` on the `tiny`
preset and a small synthetic dataset written with preprocess.shard_format's writer; the runs are
shared by the tests that look at them. conftest.py skips all of this without CUDA.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.benchmark_results import REPO_ROOT
from benchmarks.gpu_validation import SAMPLING_RATE, launch_trainer, write_synthetic_dataset
from train.sync_debug import SYNC_WARNING, SyncRecorder

MAX_STEPS = 3
MAX_BATCH_SECONDS = 8.0
# Every ZeRO-1/2/3 config in bf16 or fp16 that ds_configs/ ships (not all stages have fp16).
CONFIGS = sorted(
    path.name
    for precision in ("bf16", "fp16")
    for path in (REPO_ROOT / "ds_configs").glob(f"zero[123]_{precision}.json")
)
REFERENCE_RUN = ("zero2_bf16.json", 1)
# Every (config, ranks) launch the parametrized tests look at, most telling first; conftest.py
# runs the tests in this order, so a run killed at its time limit still has the first results.
# On one GPU, where the 2-rank launches skip: bf16 ZeRO-2 (NCCL, export, pipeline, then the
# sync-debug rerun of it), then each other config.
LAUNCHES = sorted(
    itertools.product(CONFIGS, (1, 2)), key=lambda launch: (launch != REFERENCE_RUN, launch[1])
)
# A tiny launch takes 10 s to its first step on 2 CPUs; a hung one (NCCL, a DataLoader) is killed
# with its ranks here rather than holding the GPU through the tests after it.
LAUNCH_TIMEOUT_SECONDS = 120
REPOSITORY_CODE = [REPO_ROOT / "train", REPO_ROOT / "preprocess"]
# NCCL announces its communicators in the log, which shows the ranks really ran on NCCL.
NCCL_LOGGING = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT"}


@dataclass(frozen=True)
class TrainerRun:
    output_dir: Path
    log: str

    def steps(self) -> list[dict]:
        lines = (self.output_dir / "metrics.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if "loss" in record]


TrainerRuns = Callable[..., TrainerRun]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 synthetic clips of 1 to 4 s: a few batches per rank and step."""
    lengths = np.random.default_rng(0).integers(SAMPLING_RATE, 4 * SAMPLING_RATE, 32)
    return write_synthetic_dataset(tmp_path_factory.mktemp("gpu-dataset"), lengths, seed=0)


@pytest.fixture(scope="session")
def trainer_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainerRuns:
    """run(config, num_ranks, environment=None): launched on first use, then shared.

    A failed launch is remembered too, so the tests that share it fail without relaunching.
    """
    runs: dict[tuple, TrainerRun | RuntimeError] = {}

    def run(config: str, num_ranks: int, environment: dict[str, str] | None = None) -> TrainerRun:
        if num_ranks > torch.cuda.device_count():
            pytest.skip(f"needs {num_ranks} GPUs, found {torch.cuda.device_count()}")
        key = (config, num_ranks, tuple(sorted((environment or {}).items())))
        if key not in runs:
            output = tmp_path_factory.mktemp(f"{Path(config).stem}-{num_ranks}rank")
            log_file = output.with_suffix(".log")
            try:
                launch_trainer(
                    dataset,
                    output,
                    "tiny",
                    REPO_ROOT / "ds_configs" / config,
                    MAX_STEPS,
                    MAX_BATCH_SECONDS,
                    num_ranks,
                    log_file,
                    environment={**NCCL_LOGGING, **(environment or {})},
                    timeout_seconds=LAUNCH_TIMEOUT_SECONDS,
                )
                runs[key] = TrainerRun(output, log_file.read_text())
            except RuntimeError as error:
                runs[key] = error
        if isinstance(runs[key], RuntimeError):
            pytest.fail(f"the trainer failed: {runs[key]}")
        return runs[key]

    return run


@pytest.mark.parametrize(("config", "num_ranks"), LAUNCHES)
def test_trains_checkpoints_and_exports_under_nccl(
    trainer_runs: TrainerRuns, config: str, num_ranks: int
) -> None:
    run = trainer_runs(config, num_ranks)
    assert "NCCL INFO" in run.log
    steps = run.steps()
    assert [record["step"] for record in steps] == list(range(1, MAX_STEPS + 1))
    assert all(np.isfinite(record["loss"]) for record in steps)
    latest = (run.output_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step{MAX_STEPS}"
    assert (run.output_dir / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(("config", "num_ranks"), LAUNCHES)
def test_export_equals_the_fp32_master_weights(
    trainer_runs: TrainerRuns, config: str, num_ranks: int
) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    run = trainer_runs(config, num_ranks)
    exported = load_file(str(run.output_dir / "model" / "model.safetensors"))
    checkpoint = get_fp32_state_dict_from_zero_checkpoint(
        str(run.output_dir / "checkpoints"), tag=f"step{MAX_STEPS}"
    )
    masters = {name: t for name, t in checkpoint.items() if t.dtype == torch.float32}
    assert "lm_head.weight" in masters
    for name, master in masters.items():
        torch.testing.assert_close(exported[name], master, rtol=0, atol=1e-6, msg=name)
    # Frozen parameters have no fp32 master: the checkpoint holds them at the engine's 16-bit
    # precision (ZeRO-2/3; ZeRO-1 not at all), and the export must round to exactly that.
    for name, held in checkpoint.items():
        if name not in masters:
            assert torch.equal(exported[name].to(held.dtype), held), name


def test_export_transcribes_through_pipeline_as_greedy_decoding_does(
    trainer_runs: TrainerRuns, dataset: Path
) -> None:
    import transformers
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    from preprocess.shard_format import ShardDataset

    model_dir = str(trainer_runs(*REFERENCE_RUN).output_dir / "model")
    clip = np.array(ShardDataset(str(dataset))[0]["audio"])
    recognizer = transformers.pipeline("automatic-speech-recognition", model=model_dir, device=0)
    transcript = recognizer(clip)["text"]

    processor = Wav2Vec2Processor.from_pretrained(model_dir)
    model = Wav2Vec2ForCTC.from_pretrained(model_dir).to("cuda").eval()
    inputs = processor.feature_extractor(clip, sampling_rate=SAMPLING_RATE, return_tensors="pt").to(
        "cuda"
    )
    with torch.no_grad():
        token_ids = model(**inputs).logits.argmax(-1)[0]
    assert transcript == processor.tokenizer.decode(token_ids)


def deliberate_sync(values: torch.Tensor) -> tuple[float, int]:
    """Copies a device value to the host, the sync a recorder must catch; returns the value
    and the line that made the sync."""
    line = inspect.currentframe().f_lineno + 1
    total = values.sum().item()
    return total, line


def test_recorder_catches_a_deliberate_sync_and_counts_nothing_else() -> None:
    """The positive control: an empty record of the trainer's syncs means something only if a
    sync made inside `watch()` is recorded, where it was made."""
    recorder = SyncRecorder(enabled=True)
    values = torch.ones(4, device="cuda")
    with pytest.warns(DeprecationWarning, match="not a sync"), recorder.watch():
        total, line = deliberate_sync(values)
        warnings.warn("not a sync", DeprecationWarning, stacklevel=1)
    assert total == 4.0
    ((message, file, recorded_line), count) = recorder.seen.popitem()
    assert message.startswith(SYNC_WARNING) and (file, recorded_line) == (__file__, line)
    assert count == 1 and recorder.seen == {}


def test_training_steps_sync_the_host_only_in_library_code(trainer_runs: TrainerRuns) -> None:
    run = trainer_runs(*REFERENCE_RUN, environment={"W2V2_SYNC_DEBUG": "1"})
    syncs = json.loads((run.output_dir / "sync_debug.json").read_text())
    assert isinstance(syncs, list)
    assert all({"message", "file", "line", "count"} <= set(sync) for sync in syncs)
    assert all(sync["message"].startswith(SYNC_WARNING) for sync in syncs)

    def in_repository_code(file: str) -> bool:
        path = (REPO_ROOT / file).resolve()
        return any(path.is_relative_to(directory) for directory in REPOSITORY_CODE)

    library = Counter()
    for sync in syncs:
        if not in_repository_code(sync["file"]):
            library[f"{sync['file']}:{sync['line']}: {sync['message']}"] += sync["count"]
    print(f"{sum(library.values())} host syncs in library code:")
    for where, count in library.most_common():
        print(f"  {count:5d}× {where}")
    # The recorder was live in the trainer: DeepSpeed decides on the host whether a step's
    # gradients overflowed (the skip of a non-finite step), so every step syncs there.
    assert any(f"{os.sep}deepspeed{os.sep}" in sync["file"] for sync in syncs), syncs
    ours = [sync for sync in syncs if in_repository_code(sync["file"])]
    assert not ours, json.dumps(ours, indent=1)
