"""GPU validation in one command: tests/gpu, then our trainer against the HF Trainer on one GPU.

    python -m benchmarks.gpu_validation             # about 5 minutes on one H200
    python -m benchmarks.gpu_validation --dry_run   # tiny, on CPU: shows that it starts

The GPU machine has no package index. Build the wheels it lacks here with
`bash benchmarks/gpu_wheels.sh` (into gpu_wheels/, git-ignored), carry that folder over, and
install them there (or pass `--install_wheels gpu_wheels` to this command):

    pip install --no-index --find-links gpu_wheels -r gpu_wheels/requirements.txt

Stages, each followed by writing benchmarks/results/gpu_validation.json, so a run cut short
still leaves what it measured:

1. `pytest tests/gpu` in a subprocess with a time limit: passed, failed, skipped counts.
2. A dataset of synthetic clips with Common Voice-like lengths (benchmarks/batching_padding.py's
   distribution), written with preprocess.shard_format's writer: no Ray, no audio codecs.
3. Per preset (`base`, `large`, random init), on one GPU: our trainer through the deepspeed
   launcher with ds_configs/zero2_bf16.json, and the HF Trainer (bf16 autocast, no DeepSpeed)
   fed from the same shards through a map-style dataset (HF `datasets` is not on that machine),
   length-grouped batches of the mean-matched size. Each runs warm-up plus timed steps.

Figures per run:

- audio seconds per second and median step time over the timed steps (per-step records:
  our metrics.jsonl; for the HF Trainer a callback writes the same fields);
- MFU = training FLOPs per audio second × audio seconds per second / the device's dense bf16
  peak (H200: 989 TFLOP/s; MFU is left empty on other devices). FLOPs of one clip of n samples,
  forward, counting 2 per multiply-add of convolutions and matrix products (norms, activations
  and softmax left out): conv layer i with kernel k_i, stride s_i, C_{i-1} → C_i channels
  (C_0 = 1) over L_i = ⌊(L_{i-1} − k_i) / s_i⌋ + 1 frames (L_0 = n) costs 2·C_{i-1}·C_i·k_i·L_i;
  with T = L_7 frames, hidden size h, FFN size f, V outputs, positional conv kernel K in g
  groups: feature projection 2·C_7·h·T, positional conv 2·h·(h/g)·K·T, each transformer layer
  2·T·(4h² + 2hf) + 4·T²·h, CTC head 2·T·h·V. Training costs the frozen conv encoder's forward
  once and everything after it three times (forward and backward); summed over the dataset's
  clips and divided by its audio seconds;
- peak GPU memory, two ways: device-wide memory in use, polled here with cudaMemGetInfo every
  0.1 s, above its level before the run (CUDA contexts and the caching allocator's reserve
  included; the same method for both systems), and torch.cuda.max_memory_allocated inside the
  training process (the HF child records it; ours when the trainer logs
  `max_memory_allocated_gib` in metrics.jsonl);
- startup to the first optimizer step, from the training process's creation: ours from
  OUTPUT/startup.json (the rank process, the launcher's own processes before it excluded), the
  HF Trainer's from a callback.

It reuses the other benchmarks' helpers (training_throughput's trainer command and timed
child, batching_padding's clip lengths and batch sizes); importing it, or collecting tests/gpu,
loads no Ray and no audio codec, which the GPU machine lacks (tests/test_gpu_validation.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from benchmarks.batching_padding import common_voice_like_lengths, mean_matched_batch_size
from benchmarks.benchmark_inputs import work_directory
from benchmarks.benchmark_results import (
    REPO_ROOT,
    add_output_arguments,
    grouped_bars,
    new_figure,
    print_rows,
    result_row,
    save_figure,
    write_results,
)
from benchmarks.hf_trainer_baseline import CTCPaddingCollator, PhaseClock, length_grouping
from benchmarks.training_throughput import (
    OFFLINE,
    device_description,
    ds_config,
    kill_tree,
    run_sampled,
    step_statistics,
    trainer_command,
)
from preprocess import shard_format
from preprocess.text_normalization import build_vocab

NAME = "gpu_validation"
TITLE = "GPU validation: tests/gpu, and our trainer against the HF Trainer on one GPU"
SAMPLING_RATE = 16_000
BUDGET_SECONDS = 300
TESTS_DIR = REPO_ROOT / "tests" / "gpu"
SYSTEMS = {
    "ours": "ours (deepspeed launcher, ZeRO-2)",
    "hf_trainer": "HF Trainer (no DeepSpeed), length-grouped mean-matched batches",
}
# Dense bf16 tensor-core peak by device name; MFU stays empty on devices not listed.
PEAK_BF16_FLOPS = {"H200": 989e12}
# The key our trainer would log torch.cuda.max_memory_allocated under, in GiB.
TRAINER_MEMORY_KEY = "max_memory_allocated_gib"
# Characters of the synthetic transcripts: the demo corpus's German lowercase letters.
ALPHABET = list("abcdefghijklmnopqrstuvwxyzäöüß")
ROWS_PER_RECORD_BATCH = 64
# The arguments details.settings records.
SETTINGS = (
    "presets",
    "precision",
    "steps",
    "warmup_steps",
    "max_batch_seconds",
    "audio_minutes",
    "dataloader_num_workers",
    "seed",
)


# --- Inputs: wheels, synthetic shards -----------------------------------------------------------


def install_wheels(folder: Path) -> None:
    """Installs what benchmarks/gpu_wheels.sh put in `folder`, offline; present packages stay."""
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    subprocess.run([*command, "-r", str(folder / "requirements.txt")], check=True)
    importlib.invalidate_caches()


def synthetic_clip(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced-speech-like float32 signal: a gliding harmonic tone over a little noise."""
    seconds = np.arange(num_samples) / SAMPLING_RATE
    vibrato = 1 + 0.1 * np.sin(2 * np.pi * rng.uniform(1, 4) * seconds)
    phase = 2 * np.pi * np.cumsum(rng.uniform(90, 220) * vibrato) / SAMPLING_RATE
    tone = np.sin(phase) + np.sin(2 * phase) / 2 + np.sin(3 * phase) / 3
    return (0.1 * tone + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def synthetic_transcript(seconds: float, rng: np.random.Generator) -> str:
    """Random words at about speech rate (2.5 words, some 13 characters per second)."""
    words = max(1, round(2.5 * seconds))
    return " ".join("".join(rng.choice(ALPHABET, rng.integers(2, 8))) for _ in range(words))


def write_synthetic_dataset(directory: Path, num_samples: Sequence[int], seed: int) -> Path:
    """A dataset directory of synthetic clips, written as preprocess/prepare_dataset.py writes one.

    Staged shards from ShardWriter, then commit_run: length index, vocab.json, dataset.json.
    Nothing decodes audio and Ray is not involved; the GPU machine has neither.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    run_id = f"synthetic-seed{seed}"
    schema = shard_format.shard_schema([])
    writer = shard_format.ShardWriter(
        str(directory / shard_format.STAGING_DIR / run_id), f"shard-{run_id}", schema, 256 * 2**20
    )
    lengths = [int(n) for n in num_samples]
    transcripts = [synthetic_transcript(n / SAMPLING_RATE, rng) for n in lengths]
    for start in range(0, len(lengths), ROWS_PER_RECORD_BATCH):
        rows = range(start, min(start + ROWS_PER_RECORD_BATCH, len(lengths)))
        columns = [
            pa.array([f"{run_id}-{row:06d}" for row in rows]),
            shard_format.audio_array([synthetic_clip(lengths[row], rng) for row in rows]),
            pa.array([lengths[row] for row in rows], pa.int64()),
            pa.array([transcripts[row] for row in rows]),
            pa.array([transcripts[row] for row in rows]),
        ]
        writer.write(pa.RecordBatch.from_arrays(columns, schema=schema))
    run = shard_format.RunRecord(
        run_id=run_id,
        manifest="synthetic",
        accepted=len(lengths),
        rejected=0,
        skipped_already_processed=0,
        input_seconds=sum(lengths) / SAMPLING_RATE,
        wall_seconds=time.perf_counter() - started,
    )
    options = {"sampling_rate": SAMPLING_RATE, "synthetic_seed": seed}
    shard_format.commit_run(
        str(directory), None, writer.close(), [], build_vocab(transcripts), options, run
    )
    return directory


def benchmark_clip_lengths(audio_minutes: float, seed: int) -> np.ndarray:
    """Common Voice-like clip lengths in samples, just enough of them for `audio_minutes`."""

    total = int(audio_minutes * 60 * SAMPLING_RATE)
    # Every clip is at least a second long, so this many draws always reach the total.
    lengths = common_voice_like_lengths(math.ceil(audio_minutes * 60) + 1, seed)
    return lengths[: int(np.searchsorted(np.cumsum(lengths), total)) + 1]


# --- Running the systems --------------------------------------------------------------------------


def launch_trainer(
    dataset: Path,
    output_dir: Path,
    preset: str,
    config: Path,
    max_steps: int,
    max_batch_seconds: float,
    num_ranks: int,
    log_file: Path,
    dataloader_num_workers: int = 1,
    environment: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs train/run_finetuning.py through the deepspeed launcher, as a user does.

    training_throughput's command and timed child, with the repository on PYTHONPATH (the
    GPU machine does not pip-install the project, and the launcher runs the script by path).
    Raises RuntimeError with the log's tail if it fails. On CPU, DeepSpeed leaves a shared
    memory buffer per rank in /dev/shm, named with the rendezvous port; this run's are removed.
    """

    command = trainer_command(
        dataset,
        output_dir,
        preset,
        config,
        max_steps,
        max_batch_seconds,
        dataloader_num_workers,
        num_ranks,
    )
    port = command[command.index("--master_port") + 1]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    try:
        return run_sampled(command, log_file, {"PYTHONPATH": python_path, **(environment or {})})
    finally:
        for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            buffer.unlink(missing_ok=True)


@contextlib.contextmanager
def device_memory_peak(enabled: bool, interval_seconds: float = 0.1) -> Iterator[dict[str, Any]]:
    """Yields a dict that gets "peak_device_memory_gib": GPU 0's peak use above its level before.

    Device-wide (cudaMemGetInfo), so it sees every process on the GPU, CUDA contexts and the
    caching allocators' reserve included. None when not `enabled` (no GPU).
    """
    result: dict[str, Any] = {"peak_device_memory_gib": None}
    if not enabled:
        yield result
        return
    import torch

    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    baseline = peak = used()
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.wait(interval_seconds):
            peak = max(peak, used())

    thread = threading.Thread(target=poll, name="device-memory-poll", daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_device_memory_gib"] = (peak - baseline) / 2**30


def run_ours(preset: str, dataset: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Our trainer, one rank, ZeRO-2; figures from its metrics.jsonl and startup.json."""

    output = work / f"ours-{preset}"
    shutil.rmtree(output, ignore_errors=True)
    with device_memory_peak(args.gpu) as memory:
        process = launch_trainer(
            dataset,
            output,
            preset,
            ds_config(2, args.precision),
            args.warmup_steps + args.steps,
            args.max_batch_seconds,
            1,
            work / f"ours-{preset}.log",
            args.dataloader_num_workers,
        )
    lines = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    startup = json.loads((output / "startup.json").read_text(encoding="utf-8"))
    allocated = [r[TRAINER_MEMORY_KEY] for r in records if TRAINER_MEMORY_KEY in r]
    # Checkpoints and the export of a large model are gigabytes; only the figures stay.
    shutil.rmtree(output, ignore_errors=True)
    return {
        "records": records,
        "startup_seconds": startup.pop("total"),
        "startup_phases": startup,
        "max_memory_allocated_gib": max(allocated) if allocated else None,
        **memory,
        "process": process,
    }


def run_hf_trainer(
    preset: str, dataset: Path, batch_size: int, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The HF Trainer on the same shards in a child process (`--hf_trainer_job`)."""

    output = work / f"hf-{preset}"
    shutil.rmtree(output, ignore_errors=True)
    job = {
        "dataset": str(dataset),
        "output_dir": str(output),
        "preset": preset,
        "per_device_train_batch_size": batch_size,
        "max_steps": args.warmup_steps + args.steps,
        "bf16": args.precision == "bf16",
        "dataloader_num_workers": args.dataloader_num_workers,
        "seed": args.seed,
        "result": str(work / f"hf-{preset}-result.json"),
    }
    job_file = work / f"hf-{preset}-job.json"
    job_file.write_text(json.dumps(job, indent=1), encoding="utf-8")
    command = [sys.executable, "-m", f"benchmarks.{NAME}", "--hf_trainer_job", str(job_file)]
    # One GPU, as ours: the Trainer would spread over all visible GPUs with DataParallel.
    first_gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    environment = {"CUDA_VISIBLE_DEVICES": first_gpu} if args.gpu else None
    with device_memory_peak(args.gpu) as memory:
        process = run_sampled(command, work / f"hf-{preset}.log", environment)
    result = json.loads(Path(job["result"]).read_text(encoding="utf-8"))
    shutil.rmtree(output, ignore_errors=True)
    return {
        "records": result["records"],
        "startup_seconds": result["total"],
        "startup_phases": result["phases"],
        "max_memory_allocated_gib": result["max_memory_allocated_gib"],
        **memory,
        "process": process,
        "per_device_train_batch_size": batch_size,
        "optimizer": result["optimizer"],
    }


class ShardFeatures:
    """Our shards as the HF recipe's training rows: normalized input_values and labels.

    What the recipe's `datasets.map` would store, computed per item instead (HF `datasets` is
    not on the GPU machine); the Trainer's LengthGroupedSampler reads the lengths from it.
    """

    def __init__(self, shards: Any, feature_extractor: Any, tokenizer: Any) -> None:
        self.shards = shards
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.shards[index]
        features = self.feature_extractor(item["audio"], sampling_rate=self.shards.sampling_rate)
        return {
            "input_values": features.input_values[0],
            "labels": self.tokenizer(item["text"]).input_ids,
        }


def run_hf_trainer_job(job_file: Path) -> int:
    """Child process: HF Trainer on our shards, per-step records in metrics.jsonl's fields."""
    clock = PhaseClock()
    job = json.loads(job_file.read_text(encoding="utf-8"))
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from argument_classes import ModelArguments
    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import build_model, build_processor

    clock.mark("imports")
    shards = ShardDataset(job["dataset"])
    model_args = ModelArguments(model_name_or_path=job["preset"])
    vocab_file = os.path.join(shards.path, shards.metadata["vocab"])
    processor = build_processor(model_args, vocab_file, shards.sampling_rate)
    torch.manual_seed(job["seed"])
    model = build_model(model_args, shards.vocab, shards.sampling_rate)
    clock.mark("model_build")

    grouping = length_grouping(TrainingArguments)
    workers = job["dataloader_num_workers"]
    training_args = TrainingArguments(
        output_dir=job["output_dir"],
        per_device_train_batch_size=job["per_device_train_batch_size"],
        max_steps=job["max_steps"],
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        bf16=job["bf16"],
        use_cpu=not torch.cuda.is_available(),
        seed=job["seed"],
        disable_tqdm=True,
        **grouping,
    )
    # Real and padded samples of the micro-batches since the last optimizer step.
    step_audio = {"real": 0, "padded": 0}
    steps: list[dict[str, Any]] = []
    losses: dict[int, float] = {}

    class AudioCountingTrainer(Trainer):
        """Counts each batch's audio from its attention mask, still on the host."""

        def training_step(
            self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any
        ) -> Any:
            mask = inputs["attention_mask"]
            step_audio["real"] += int(mask.sum())
            step_audio["padded"] += mask.numel()
            return super().training_step(model, inputs, *args, **kwargs)

    class StepRecorder(TrainerCallback):
        """Step time and audio of every optimizer step; the startup phases up to the first."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock.mark("train_begin")
            self.last = time.perf_counter()

        def on_step_end(self, _: Any, state: Any, __: Any, **___: Any) -> None:
            now = time.perf_counter()
            step_time, self.last = now - self.last, now
            real_seconds = step_audio["real"] / SAMPLING_RATE
            steps.append(
                {
                    "step": state.global_step,
                    "step_time": step_time,
                    "audio_seconds_per_second": real_seconds / step_time,
                    "padding_fraction": 1 - step_audio["real"] / step_audio["padded"],
                }
            )
            step_audio.update(real=0, padded=0)
            if state.global_step == 1:
                clock.mark("first_optimizer_step")

        def on_log(self, _: Any, state: Any, __: Any, logs: Any = None, **___: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer = AudioCountingTrainer(
        model=model,
        args=training_args,
        data_collator=CTCPaddingCollator(processor.feature_extractor, processor.tokenizer),
        train_dataset=ShardFeatures(shards, processor.feature_extractor, processor.tokenizer),
        processing_class=processor.feature_extractor,
        callbacks=[StepRecorder()],
    )
    clock.mark("trainer_init")
    trainer.train()
    result = {
        "phases": clock.phases,
        "total": sum(clock.phases.values()),
        "records": [{**step, "loss": losses.get(step["step"], math.nan)} for step in steps],
        "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "optimizer": str(training_args.optim),
    }
    Path(job["result"]).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


def run_gpu_tests(work: Path, timeout_seconds: float) -> dict[str, Any]:
    """`pytest tests/gpu` in a subprocess; counts from its JUnit XML.

    --confcutdir keeps tests/conftest.py (Ray, espeak-ng speech) out, as the GPU machine
    lacks what it imports. A run past `timeout_seconds` is killed with its children.
    """

    junit = work / "gpu-tests.xml"
    log_file = work / "gpu-tests.log"
    command = [sys.executable, "-m", "pytest", "--confcutdir", str(TESTS_DIR), str(TESTS_DIR)]
    command += ["-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env={**os.environ, **OFFLINE}, stdout=log, stderr=log
        )
        try:
            returncode = process.wait(timeout_seconds)
        except subprocess.TimeoutExpired:
            kill_tree(psutil.Process(process.pid))
            process.wait()
            returncode = None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.exists():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return {
        "command": shlex.join(command),
        "returncode": returncode,
        "timed_out": returncode is None,
        "seconds": time.perf_counter() - started,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "output_tail": log_file.read_text(encoding="utf-8", errors="replace")[-4000:],
    }


# --- Figures ------------------------------------------------------------------------------------


def training_flops_per_audio_second(config: Any, num_samples: np.ndarray) -> float:
    """Training FLOPs per second of audio over these clips, by the formula in the docstring."""
    frames = num_samples.astype(np.float64)
    conv = np.zeros_like(frames)
    channels_in = 1
    for channels, kernel, stride in zip(
        config.conv_dim, config.conv_kernel, config.conv_stride, strict=True
    ):
        frames = np.floor((frames - kernel) / stride) + 1
        conv += 2 * channels_in * channels * kernel * frames
        channels_in = channels
    hidden, groups = config.hidden_size, config.num_conv_pos_embedding_groups
    per_frame = 2 * channels_in * hidden
    per_frame += 2 * hidden * (hidden // groups) * config.num_conv_pos_embeddings
    per_frame += (
        config.num_hidden_layers * 2 * (4 * hidden**2 + 2 * hidden * config.intermediate_size)
    )
    per_frame += 2 * hidden * config.vocab_size
    attention = config.num_hidden_layers * 4 * frames**2 * hidden
    trainable = per_frame * frames + attention
    return float((conv + 3 * trainable).sum() / (num_samples.sum() / SAMPLING_RATE))


def preset_flops(preset: str, dataset: Path) -> float:
    """training_flops_per_audio_second for a preset with the dataset's vocabulary and clips."""
    from transformers import Wav2Vec2Config

    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import PRESETS

    shards = ShardDataset(str(dataset))
    config = Wav2Vec2Config(**PRESETS[preset], vocab_size=len(shards.vocab))
    return training_flops_per_audio_second(config, shards.num_samples)


def summarize(
    run: dict[str, Any], warmup_steps: int, flops: float, peak_flops: float | None
) -> dict[str, Any]:
    """A run's figures over its timed steps (its records are kept beside them)."""

    statistics = step_statistics(run["records"], warmup_steps)
    speed = statistics["audio_seconds_per_second"]
    return {
        "ok": True,
        **statistics,
        "mfu": flops * speed / peak_flops if peak_flops else None,
        **{key: value for key, value in run.items() if key != "process"},
        "wall_seconds": run["process"]["process_wall_seconds"],
        "peak_host_pss_gib": run["process"]["peak_pss_gib"],
    }


def build_rows(runs: dict[str, dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Per preset where both systems ran: speed (headline), memory, MFU, step time, startup."""
    rows = []
    figures = [
        ("training speed", "audio_seconds_per_second", "audio s/s", True, True),
        ("peak GPU memory in use", "peak_device_memory_gib", "GiB", False, True),
        ("MFU", "mfu", "", True, False),
        ("median step time", "median_step_time", "s", False, False),
        ("process start to first optimizer step", "startup_seconds", "s", False, False),
    ]
    for preset, systems in runs.items():
        ours, other = systems.get("ours", {}), systems.get("hf_trainer", {})
        if not (ours.get("ok") and other.get("ok")):
            continue
        for metric, key, unit, higher_is_better, headline in figures:
            if ours[key] is None or other[key] is None:
                continue
            rows.append(
                result_row(
                    f"{metric}, {preset}, {where}",
                    ours[key],
                    other[key],
                    SYSTEMS["hf_trainer"],
                    unit,
                    higher_is_better,
                    headline,
                )
            )
    return rows


def plot(runs: dict[str, dict[str, Any]], args: argparse.Namespace, where: str) -> None:
    """Speed, GPU memory and startup per preset, ours beside the HF Trainer."""
    panels = [
        ("audio_seconds_per_second", "audio seconds / second"),
        ("peak_device_memory_gib", "peak GPU memory in use (GiB)"),
        ("startup_seconds", "process start to first step (s)"),
    ]
    if not args.gpu:
        panels.pop(1)
    presets = list(runs)
    figure, axes = new_figure(len(panels), f"Ours vs HF Trainer, {where}", 4.5)
    for axis, (key, label) in zip(axes, panels, strict=True):
        series = {
            name: [runs[p].get(system, {}).get(key) or 0.0 for p in presets]
            for system, name in (("ours", "ours"), ("hf_trainer", "HF Trainer"))
        }
        grouped_bars(axis, presets, series, label, "{:.3g}")
    save_figure(figure, args, NAME)


# --- Command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny sizes on CPU with CUDA hidden: fp32, the tiny preset, 1 process, 3 steps; "
        "tests/gpu get skipped; implies --quick",
    )
    parser.add_argument(
        "--presets",
        nargs="+",
        choices=("tiny", "base", "large"),
        default=["base", "large"],
        help="(default: base large)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument(
        "--warmup_steps", type=int, default=10, help="steps before timing (default: 10)"
    )
    parser.add_argument(
        "--max_batch_seconds",
        type=float,
        default=200.0,
        help="our padded audio seconds per batch; the HF batch size is mean-matched (default: 200)",
    )
    parser.add_argument(
        "--audio_minutes", type=float, default=15.0, help="synthetic dataset size (default: 15)"
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=2, help="(default: 2)")
    parser.add_argument(
        "--test_timeout", type=float, default=180.0, help="seconds for tests/gpu (default: 180)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", type=Path, default=None, help="dataset, logs, runs")
    parser.add_argument(
        "--install_wheels",
        type=Path,
        default=None,
        metavar="DIR",
        help="first pip-install the wheels benchmarks/gpu_wheels.sh built into DIR (offline)",
    )
    parser.add_argument("--hf_trainer_job", type=Path, default=None, help=argparse.SUPPRESS)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.quick = True
        args.presets, args.steps, args.warmup_steps = ["tiny"], 2, 1
        args.max_batch_seconds, args.audio_minutes, args.test_timeout = 8.0, 1.0, 120.0
        args.dataloader_num_workers = 1
    elif args.quick:
        args.presets, args.steps, args.warmup_steps = ["base"], 5, 2
    args.precision = "fp32" if args.dry_run else "bf16"
    return args


def describe_environment() -> dict[str, Any]:
    """The device as torch sees it, and the versions that matter."""

    versions = {}
    for package in ("torch", "transformers", "deepspeed", "accelerate", "pyarrow", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": device_description(1), "versions": versions}


def result_notes(args: argparse.Namespace) -> list[str]:
    """What was compared and how, for the JSON's notes."""
    hf_precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    return [
        "Both systems train the same random-init preset with a frozen feature encoder on the "
        f"same synthetic shards, {args.warmup_steps} warm-up then {args.steps} timed steps, "
        "logging every step; audio s/s = unpadded audio seconds over the timed steps' summed "
        "step time.",
        f"Ours: `deepspeed --num_gpus 1` train/run_finetuning.py, ZeRO-2 {args.precision}, "
        f"batches of at most {args.max_batch_seconds:g} s padded audio. Other: transformers' "
        f"Trainer, {hf_precision}, no DeepSpeed, the recipe's collator, length-grouped batches "
        "of the fixed size whose mean padded seconds match our budget (batching_padding's "
        "mean-matched size).",
        "MFU and its FLOPs formula, peak memory and startup: see the module docstring of "
        "benchmarks/gpu_validation.py. Peak GPU memory in use is device-wide, polled "
        "(cudaMemGetInfo) above the level before the run; torch's max_memory_allocated is in "
        "details.runs where the training process reported it.",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.install_wheels:
        install_wheels(args.install_wheels)
    if args.hf_trainer_job:
        return run_hf_trainer_job(args.hf_trainer_job)
    if args.dry_run:
        # Set before torch initializes CUDA here or in any child.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    started = time.perf_counter()
    environment = describe_environment()
    args.gpu = environment["device"]["kind"] == "cuda"
    where = f"1 {'GPU' if args.gpu else 'CPU process'}, {args.precision}"
    device_name = environment["device"]["name"]
    peak_flops = next((f for name, f in PEAK_BF16_FLOPS.items() if name in device_name), None)
    peak_flops = peak_flops if args.precision == "bf16" else None
    runs: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {
        "environment": environment,
        "settings": {
            **{key: getattr(args, key) for key in SETTINGS},
            "peak_flops": peak_flops,
            "budget_seconds": BUDGET_SECONDS,
        },
        "runs": runs,
    }
    notes = result_notes(args)

    def save() -> Path:
        details["seconds"] = time.perf_counter() - started
        details["within_budget"] = details["seconds"] <= BUDGET_SECONDS
        return write_results(NAME, TITLE, args, argv, build_rows(runs, where), details, notes)

    with work_directory(args.work_dir) as work:
        print(f"[{NAME}] pytest tests/gpu", flush=True)
        details["tests"] = run_gpu_tests(work, args.test_timeout)
        save()
        lengths = benchmark_clip_lengths(args.audio_minutes, args.seed)
        dataset = write_synthetic_dataset(work / "dataset", lengths, args.seed)
        budget = int(args.max_batch_seconds * SAMPLING_RATE)
        hf_batch_size = mean_matched_batch_size(lengths, budget, args.seed)
        details["dataset"] = {
            "clips": len(lengths),
            "audio_minutes": float(lengths.sum()) / SAMPLING_RATE / 60,
            "mean_clip_seconds": float(lengths.mean()) / SAMPLING_RATE,
            "hf_per_device_train_batch_size": hf_batch_size,
        }
        for preset in args.presets:
            flops = preset_flops(preset, dataset)
            runs[preset] = {"training_flops_per_audio_second": flops}
            measurements = {
                "ours": partial(run_ours, preset, dataset, work, args),
                "hf_trainer": partial(run_hf_trainer, preset, dataset, hf_batch_size, work, args),
            }
            for system, measure in measurements.items():
                print(f"[{NAME}] {preset}: {SYSTEMS[system]}", flush=True)
                try:
                    runs[preset][system] = summarize(
                        measure(), args.warmup_steps, flops, peak_flops
                    )
                except (RuntimeError, OSError, ValueError, KeyError) as error:
                    runs[preset][system] = {"ok": False, "error": str(error)[-3000:]}
                    print(f"[{NAME}] failed: {str(error)[:300]}", flush=True)
                save()
    path = save()
    if importlib.util.find_spec("matplotlib") is not None:
        plot(runs, args, where)
    tests = details["tests"]
    print(
        f"tests/gpu: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
        f"{tests['skipped']} skipped{' (timed out)' if tests['timed_out'] else ''}"
    )
    print_rows(build_rows(runs, where))
    print(f"wrote {path} after {details['seconds']:.0f} s (budget {BUDGET_SECONDS} s)")
    tests_ok = tests["returncode"] == 0
    runs_ok = all(runs[p][s].get("ok") for p in runs for s in SYSTEMS)
    return 0 if tests_ok and runs_ok else 1


if __name__ == "__main__":
    sys.exit(main())
