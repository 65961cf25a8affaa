"""Fine-tune wav2vec2 for CTC with DeepSpeed ZeRO on shards made by preprocess/prepare_dataset.py.

    deepspeed --num_gpus 8 train/run_finetuning.py --deepspeed ds_configs/zero2_bf16.json \
        --train_dir data/train --eval_dir data/dev --model_name_or_path facebook/wav2vec2-base \
        --output_dir runs/de
    python -m train.run_finetuning ...      (one process)

The whole loop is in this file, top to bottom: arguments, distributed init, data, model,
deepspeed.initialize, then forward, CTC loss, backward, step, with evaluation, checkpoints and
export at their intervals. Batching, collation, evaluation and export live in modules beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import deepspeed
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm

from argument_classes import DataArguments, ModelArguments, TrainingArguments, parse_arguments
from preprocess import storage
from preprocess.dataset_cache import DatasetCacheError, cache_dataset, cache_path
from preprocess.shard_format import ShardDataset
from train.ctc_collator import CTCCollator, attention_mask
from train.deepspeed_startup import (
    import_muon_without_compiling,
    quiet_harmless_warnings,
    skip_shm_all_reduce_build,
)
from train.duration_bucket_sampler import DurationBucketSampler
from train.elastic_checkpoint import (
    BatchLayout,
    latest_trainer_state,
    universal_checkpoint,
    write_trainer_state,
)
from train.evaluation import evaluate, evaluation_batches
from train.host_group import RankFailure, host_group, raise_if_any_failed
from train.metrics_log import MetricsLog
from train.model_export import (
    engine_logits,
    export_model,
    exported_logits_difference,
    fp32_state_dict,
    frozen_fp32_parameters,
    module_digests,
    weights_digest,
)
from train.rng_state import (
    load_rng_state,
    restore_rng_state,
    rng_state_file,
    save_rng_state,
)
from train.step_statistics import StepStatistics
from train.sync_debug import SyncRecorder
from train.wav2vec2_model import ModelSetupError, build_model, build_processor

CHECKPOINT_DIR = "checkpoints"
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


class TrainingSetupError(ValueError):
    """Arguments, datasets or config that cannot work; one line for the user."""


class StartupClock:
    """Seconds spent in each startup phase, from the process's creation (as the kernel recorded
    it, so the interpreter's start and the imports count) to the first optimizer step."""

    def __init__(self) -> None:
        process_start = psutil.Process().create_time()
        self.phases = {"imports": time.time() - process_start}
        self._last = time.time()

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - self._last
        self._last = now

    def total(self) -> float:
        return sum(self.phases.values())


def init_distributed(dataloader_num_workers: int) -> None:
    """Join the launcher's process group; a plain `python` run becomes a group of one.

    NCCL on GPUs, gloo on CPUs, as DeepSpeed's accelerator names them. Each GPU rank binds its
    device before the first collective, so NCCL never puts two ranks on GPU 0.
    """
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    quiet_harmless_warnings()
    skip_shm_all_reduce_build()  # only inference calls it; on CPU a first start would build it
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    # Ranks on one host share its cores; oversubscribing them stalls every collective. The
    # deepspeed launcher says how many ranks share this host in LOCAL_SIZE, torchrun in
    # LOCAL_WORLD_SIZE. A GPU rank mostly launches kernels, and its DataLoader workers (one
    # thread each) collate on the same cores, so they get their share of it.
    local_ranks = int(
        os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or dist.get_world_size()
    )
    share = (os.cpu_count() or 1) // local_ranks
    if torch.cuda.is_available():
        share -= dataloader_num_workers
    torch.set_num_threads(max(1, share))


def validate(data: DataArguments, training: TrainingArguments) -> None:
    positive = {
        "max_batch_seconds": data.max_batch_seconds,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
        "logging_steps": training.logging_steps,
        "eval_steps": training.eval_steps,
        "save_steps": training.save_steps,
        "save_total_limit": training.save_total_limit,
        "learning_rate": training.learning_rate,
    }
    for name, value in positive.items():
        if not value > 0:
            raise TrainingSetupError(f"--{name} must be positive, got {value}")
    if training.max_steps is not None and training.max_steps <= 0:
        raise TrainingSetupError(f"--max_steps must be positive, got {training.max_steps}")
    remote = [uri for uri in (data.train_dir, data.eval_dir) if uri and storage.is_remote(uri)]
    if remote and not data.cache_dir:
        raise TrainingSetupError(
            f"{remote[0]} is in object storage: pass --cache_dir, a node-local directory to "
            "cache its shards in (they are memory-mapped)"
        )
    has_checkpoint = os.path.isfile(os.path.join(training.output_dir, CHECKPOINT_DIR, "latest"))
    if has_checkpoint and not (training.resume or training.export_only):
        raise TrainingSetupError(
            f"{training.output_dir} has checkpoints: pass --resume to continue from them, "
            "or choose another --output_dir"
        )
    if (training.resume or training.export_only) and not has_checkpoint:
        raise TrainingSetupError(f"no checkpoint to resume from in {training.output_dir}")


def local_dataset_path(uri: str, cache_dir: str | None, group: Any) -> str:
    """The directory to memory-map: `uri` itself, or its node-local cache for s3:// URIs.

    A collective on `group` for remote URIs: local rank 0 of each node brings the node's
    cache up to date (under the cache's own file lock, so other jobs on the node wait for it
    too) while the others wait on a group made for long waits. A failed download stops every
    rank of every node with one line naming the node and the file.
    """
    if not storage.is_remote(uri):
        return uri
    assert cache_dir is not None  # validate() requires it
    failure = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        try:
            result = cache_dataset(uri, cache_dir)
        except DatasetCacheError as error:
            failure = str(error)
        else:
            repaired = f", repaired {len(result.repaired)}" if result.repaired else ""
            print(
                f"cache {socket.gethostname()}: {uri} -> {result.path}: downloaded "
                f"{len(result.downloaded)} files ({result.downloaded_bytes} bytes), "
                f"kept {result.kept}{repaired}",
                flush=True,
            )
    raise_if_any_failed(group, failure)
    return cache_path(uri, cache_dir)


def open_datasets(data: DataArguments, group: Any) -> tuple[ShardDataset, ShardDataset | None]:
    try:
        train_set = ShardDataset(local_dataset_path(data.train_dir, data.cache_dir, group))
        eval_set = (
            ShardDataset(local_dataset_path(data.eval_dir, data.cache_dir, group))
            if data.eval_dir
            else None
        )
    except (FileNotFoundError, ValueError) as error:
        raise TrainingSetupError(str(error)) from None
    if eval_set is not None:
        if eval_set.sampling_rate != train_set.sampling_rate:
            raise TrainingSetupError(
                f"eval data is {eval_set.sampling_rate} Hz, train data {train_set.sampling_rate} Hz"
            )
        unknown = sorted(set(eval_set.vocab) - set(train_set.vocab))
        if unknown and int(os.environ.get("RANK", "0")) == 0:
            # The model cannot emit them, so they count as errors: honest, and worth knowing.
            print(
                f"warning: eval transcripts use characters unseen in training: {''.join(unknown)}"
            )
    return train_set, eval_set


def deepspeed_config(
    training: TrainingArguments, total_steps: int, accumulation: int
) -> dict[str, Any]:
    """The chosen ds_configs file with this run's values filled in (the launcher's one truth).

    A path that does not exist from the current directory is looked up among the shipped
    configs by name, so `--deepspeed zero2_bf16.json` works from anywhere.
    """
    path = training.deepspeed
    shipped = SHIPPED_CONFIGS / os.path.basename(path)
    if not os.path.exists(path) and shipped.is_file():
        path = str(shipped)
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        message = f"cannot read DeepSpeed config {training.deepspeed}: {error}"
        raise TrainingSetupError(message) from None
    # Batches hold a variable number of utterances; DeepSpeed only counts micro-batches.
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = accumulation
    config.pop("train_batch_size", None)
    config["gradient_clipping"] = training.max_grad_norm
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer["params"].update(lr=training.learning_rate, weight_decay=training.weight_decay)
    zero = config.setdefault("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    if not torch.cuda.is_available() and not offloaded:
        # Without torch_adam DeepSpeed builds its FusedAdam, which needs CUDA.
        optimizer["params"].setdefault("torch_adam", True)
    # A non-finite loss gives non-finite gradients; DeepSpeed's check of the global gradient
    # norm then skips the whole step on every rank. That check is what makes the skip real.
    if (
        zero.get("compute_grad_norm") is False
        or config.get("bf16", {}).get("check_grad_overflow") is False
    ):
        raise TrainingSetupError(
            "zero_optimization.compute_grad_norm and bf16.check_grad_overflow must stay on: "
            "they are how a step with a non-finite loss is skipped"
        )
    config["scheduler"] = {
        "type": "WarmupDecayLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": training.learning_rate,
            # DeepSpeed rejects zero warmup steps and a decay shorter than the warmup.
            "warmup_num_steps": max(1, min(training.warmup_steps, total_steps - 1)),
            "total_num_steps": max(total_steps, 2),
            "warmup_type": "linear",
        },
    }
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise TrainingSetupError(f"zero_optimization.stage must be 1, 2 or 3, got {stage}")
    return config


class IdentifiedCollator:
    """Collates and keeps the utterance ids, so logs and traces show which data a step saw."""

    def __init__(self, collator: CTCCollator) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> tuple[list[str], dict[str, torch.Tensor]]:
        return [item["id"] for item in items], self.collator(items)


def ctc_loss_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    input_frames: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> torch.Tensor:
    """Summed CTC loss over the batch, in fp32 whatever the engine's dtype.

    Summed, not averaged, so the loop can divide by the step's target length over all ranks
    and micro-batches: ranks holding batches of different sizes then weigh correctly. Targets
    stay padded 2-D (no data-dependent masked_select) and the lengths are host tensors, which
    ctc_loss wants on the host anyway, so nothing here waits for the device.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)
    return F.ctc_loss(
        log_probs,
        labels.clamp(min=0),  # the -100 padding lies past each target length, never read
        input_frames,
        target_lengths,
        blank=blank,
        reduction="sum",
        zero_infinity=True,
    )


def prune_checkpoints(checkpoint_dir: str, keep: int) -> None:
    """Keeps the last `keep` steps' checkpoints, with their universal conversions."""
    tags = [re.fullmatch(r"step(\d+)(_universal)?", t) for t in os.listdir(checkpoint_dir)]
    steps = sorted({int(match[1]) for match in tags if match})
    for match in tags:
        if match and int(match[1]) in steps[: max(len(steps) - keep, 0)]:
            shutil.rmtree(os.path.join(checkpoint_dir, match[0]), ignore_errors=True)


def save_checkpoint(
    engine: Any,
    checkpoint_dir: str,
    step: int,
    client_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> None:
    """Checkpoint `step{step}` (a collective): rank 0's trainer state first, then each rank's
    generators, then DeepSpeed's files and its `latest`, written last, so a checkpoint that
    `latest` names is whole. Rank 0 then prunes all but the last `keep`."""
    tag, rank = f"step{step}", dist.get_rank()
    if rank == 0:
        write_trainer_state(checkpoint_dir, tag, trainer_state)
    save_rng_state(rng_state_file(checkpoint_dir, tag, rank))
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state=client_state)
    if rank == 0:
        prune_checkpoints(checkpoint_dir, keep)


def batch_layout(
    saved: dict[str, Any] | None, world_size: int, data: DataArguments, training: TrainingArguments
) -> BatchLayout:
    """How this run splits its global batch over ranks, accumulation and micro-batches.

    As asked on a fresh run. A resumed run keeps the global batch its checkpoint was trained
    with and splits it for this world size, no micro-batch over --max_batch_seconds
    (`BatchLayout.for_world_size`); rank 0 says so when that differs from what was asked.
    """
    asked = BatchLayout(world_size, training.gradient_accumulation_steps, data.max_batch_seconds)
    if saved is None:
        return asked
    planned = BatchLayout(
        saved["world_size"],
        saved.get("gradient_accumulation_steps", asked.gradient_accumulation_steps),
        saved.get("max_batch_seconds", asked.max_batch_seconds),
    )
    layout = planned.for_world_size(world_size, data.max_batch_seconds)
    if layout != asked and dist.get_rank() == 0:
        print(
            f"resuming a run of {planned.global_batch_seconds:g} audio seconds per step on "
            f"{world_size} ranks (it was {planned.world_size}): gradient_accumulation_steps "
            f"{layout.gradient_accumulation_steps}, max_batch_seconds "
            f"{layout.max_batch_seconds:.6g}",
            flush=True,
        )
    return layout


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments), sys.argv[1:] if argv is None else argv
    )
    startup = StartupClock()
    validate(data_args, training)
    init_distributed(data_args.dataloader_num_workers)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    # Object collectives (cache and conversion waits, evaluation transcripts) run on gloo
    # whatever the device backend, with a timeout fit for downloads.
    cpu_group = host_group()
    startup.mark("distributed_init")

    # Data: open the memory-mapped shards and plan every batch from the length index alone.
    train_set, eval_set = open_datasets(data_args, cpu_group)
    checkpoint_dir = os.path.join(training.output_dir, CHECKPOINT_DIR)
    resuming = training.resume or training.export_only
    try:
        saved = latest_trainer_state(checkpoint_dir) if resuming else None
    except FileNotFoundError as error:
        raise TrainingSetupError(str(error)) from None
    if saved is not None and saved.get("vocab", train_set.vocab) != train_set.vocab:
        raise TrainingSetupError(
            f"the checkpoint in {checkpoint_dir} was trained on another vocabulary than "
            f"{data_args.train_dir}'s"
        )
    layout = batch_layout(saved, world_size, data_args, training)
    sampler = DurationBucketSampler(
        num_samples=train_set.num_samples,
        sampling_rate=train_set.sampling_rate,
        max_batch_seconds=layout.max_batch_seconds,
        world_size=world_size,
        rank=rank,
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
        num_buckets=data_args.num_buckets,
        seed=training.seed,
    )
    accumulation = layout.gradient_accumulation_steps
    try:
        steps_per_epoch = len(sampler.plan_epoch(0)) // accumulation
    except ValueError as error:
        raise TrainingSetupError(str(error)) from None
    # The schedule spans the steps planned when the run began (or --max_steps). An elastic
    # resume keeps the global batch, so its steps per epoch, and thus that total, still hold.
    total_steps = (
        training.max_steps
        or (saved and saved["total_steps"])
        or math.ceil(steps_per_epoch * training.num_train_epochs)
    )
    # A run of whole epochs ends with its last epoch, not at a step count: a re-planned epoch
    # may come out a step short or long of the plan it replaced, and must still finish once.
    whole_epochs = not training.max_steps and float(training.num_train_epochs).is_integer()
    epochs = math.ceil(training.num_train_epochs) if not training.max_steps else math.inf
    startup.mark("dataset_open_and_batch_plan")

    # Model: under ZeRO-3, HfDeepSpeedConfig must be alive while the model is built, so its
    # weights are created partitioned and the weight-normed positional conv is gathered right.
    ds_config = deepspeed_config(training, total_steps, accumulation)
    elastic = saved is not None and saved["world_size"] != world_size
    if elastic:
        ds_config["checkpoint"] = {"load_universal": True}
    hf_deepspeed_config = None
    if ds_config["zero_optimization"]["stage"] == 3:
        # Imported only here: it pulls in accelerate, which other stages never use.
        from transformers.integrations import HfDeepSpeedConfig

        hf_deepspeed_config = HfDeepSpeedConfig(ds_config)
    torch.manual_seed(training.seed)
    vocab = train_set.vocab
    vocab_file = os.path.join(train_set.path, train_set.metadata["vocab"])
    processor = build_processor(model_args, vocab_file, train_set.sampling_rate)
    model = build_model(model_args, vocab, train_set.sampling_rate)
    # Frozen weights have no fp32 master copy in DeepSpeed and are cast to bf16/fp16 with the
    # module; the export takes them from here, at the precision they were loaded with.
    frozen_fp32 = frozen_fp32_parameters(model)
    startup.mark("model_build")

    import_muon_without_compiling()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    input_dtype = (
        torch.bfloat16
        if engine.bfloat16_enabled()
        else torch.float16
        if engine.fp16_enabled()
        else torch.float32
    )
    if input_dtype == torch.float32 and torch.cuda.is_available():
        # TF32 tensor cores (Ampere and newer) for fp32 runs; no effect on older GPUs.
        torch.set_float32_matmul_precision("high")
    startup.mark("deepspeed_initialize")

    step, epoch, nonfinite_losses = 0, 0, 0
    resumed_rng = resumed_digest = None
    if saved is not None:
        # Written by another number of ranks: load its universal form, any world size reads it.
        tag = universal_checkpoint(checkpoint_dir, saved, cpu_group) if elastic else saved["tag"]
        _, client_state = engine.load_checkpoint(checkpoint_dir, tag=tag)
        try:
            sampler.load_state_dict(client_state["sampler"])
        except ValueError as error:
            raise TrainingSetupError(
                f"the checkpoint does not fit this train set: {error}"
            ) from None
        step, epoch = client_state["step"], client_state["sampler"]["epoch"]
        nonfinite_losses = client_state.get("nonfinite_losses", 0)
        if not elastic:  # the generators of ranks that no longer exist cannot be continued
            resumed_rng = load_rng_state(rng_state_file(checkpoint_dir, saved["tag"], rank))
        if training.trace_batches:  # an audit of what was loaded: a collective, gathering all
            resumed_digest = weights_digest(fp32_state_dict(engine, frozen_fp32))
    if training.export_only:
        target = export_model(engine, processor, training.output_dir, frozen_fp32)
        if is_main:
            print(f"exported step {step} to {target}")
        return 0

    feature_extractor = processor.feature_extractor
    use_attention_mask = feature_extractor.return_attention_mask
    collator = CTCCollator(vocab=vocab, do_normalize=feature_extractor.do_normalize)
    blank_id = engine.module.config.pad_token_id
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        collate_fn=IdentifiedCollator(collator),
        num_workers=data_args.dataloader_num_workers,
        persistent_workers=data_args.dataloader_num_workers > 0,
        # Page-locked batches copy to the GPU asynchronously (non_blocking below).
        pin_memory=torch.cuda.is_available(),
    )
    eval_plan = None
    if eval_set is not None:
        eval_lengths = eval_set.num_samples
        if data_args.max_eval_utterances:
            eval_lengths = eval_lengths[: data_args.max_eval_utterances]
        eval_plan = evaluation_batches(
            eval_lengths, eval_set.sampling_rate, data_args.max_batch_seconds, world_size
        )

    os.makedirs(training.output_dir, exist_ok=True)
    metrics = MetricsLog(training.output_dir, enabled=is_main)
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, desc="steps")

    def run_evaluation() -> None:
        result = evaluate(
            engine,
            dataset=eval_set,
            batches=eval_plan[rank],
            num_batches=max(len(batches) for batches in eval_plan),
            collate=collator,
            tokenizer=processor.tokenizer,
            input_dtype=input_dtype,
            use_attention_mask=use_attention_mask,
            cpu_group=cpu_group,
            num_workers=data_args.dataloader_num_workers,
        )
        metrics.write({"step": step, **result})
        if is_main:
            tqdm.write(
                f"step {step}: WER {result['eval_wer']:.3f} CER {result['eval_cer']:.3f} "
                f"({result['eval_utterances']} utterances) e.g. {result['eval_example']!r}"
            )

    statistics = StepStatistics(engine.device)
    batch_trace = None
    if training.trace_batches:
        trace_dir = os.path.join(training.output_dir, "batch_trace")
        os.makedirs(trace_dir, exist_ok=True)
        batch_trace = open(os.path.join(trace_dir, f"rank{rank}.jsonl"), "a", buffering=1)
    sync_recorder = SyncRecorder.from_environment()
    interval_started = time.time()
    layerdrop = getattr(engine.module, "synced_layerdrop", None)
    if resumed_digest is not None:
        metrics.write({"step": step, "resumed_fp32_sha256": resumed_digest})
    engine.train()
    finished = not whole_epochs and step >= total_steps
    while epoch < epochs and not finished:
        sampler.set_epoch(epoch)
        # Each micro-step's target tokens over all ranks, known from the plan without talking.
        plan_targets = sampler.micro_step_totals(train_set.text_lengths, epoch)
        first_micro_step = sampler.state_dict(consumed_in_pass=0)["consumed_micro_steps"]
        for consumed, (ids, batch) in enumerate(loader, start=1):
            micro_step = first_micro_step + consumed - 1
            window = micro_step - micro_step % accumulation
            step_targets = int(plan_targets[window : window + accumulation].sum())
            if step == 0 and consumed == 1:
                startup.mark("first_batch")
            if resumed_rng is not None:
                # Restored only now: starting the DataLoader's iterator above drew from the
                # generator, which the uninterrupted run did not do at this point.
                restore_rng_state(resumed_rng)
                resumed_rng = None

            with sync_recorder.watch():
                # Copy, then cast on the device: a cast on the host would copy synchronously.
                input_values = batch["input_values"].to(engine.device, non_blocking=True)
                input_values = input_values.to(input_dtype)
                mask = (
                    attention_mask(batch["input_lengths"], input_values.shape[1], engine.device)
                    if use_attention_mask
                    else None
                )
                labels = batch["labels"].to(engine.device, non_blocking=True)
                input_frames = engine.module._get_feat_extract_output_lengths(
                    batch["input_lengths"]
                )
                if layerdrop is not None:
                    layerdrop.reseed(training.seed, step, micro_step)
                logits = engine(input_values, attention_mask=mask).logits
                loss_sum = ctc_loss_sum(
                    logits, labels, input_frames, batch["target_lengths"], blank_id
                )
                # DeepSpeed averages gradients over ranks; scaling by world_size makes the
                # update the step's summed loss over its target tokens on all ranks. A
                # non-finite loss is not special-cased here: its gradients are non-finite, and
                # DeepSpeed's gradient-norm check at the step boundary then skips the whole
                # step on every rank (weights and optimizer state untouched, counted in
                # engine.skipped_steps), with no host sync per micro-step.
                engine.backward(loss_sum * world_size / step_targets, scale_wrt_gas=False)
                engine.step()
                statistics.add_loss(loss_sum, int(batch["target_lengths"].sum()))
            statistics.add_batch(
                audio_seconds=int(batch["input_lengths"].sum()) / train_set.sampling_rate,
                padded_seconds=input_values.numel() / train_set.sampling_rate,
                checksum=zlib.crc32("\n".join(ids).encode()),
            )
            if batch_trace is not None:
                trace = {"step": step + 1, "micro_step": micro_step, "epoch": epoch, "ids": ids}
                batch_trace.write(json.dumps(trace) + "\n")
            if (micro_step + 1) % accumulation:
                continue

            step += 1
            progress.update(1)
            if step == 1:
                startup.mark("first_optimizer_step")
                if is_main:
                    with open(os.path.join(training.output_dir, "startup.json"), "w") as file:
                        json.dump({**startup.phases, "total": startup.total()}, file, indent=1)
            if whole_epochs:
                finished = epoch + 1 == epochs and micro_step + 1 == len(plan_targets)
            else:
                finished = step >= total_steps
            is_save_step = step % training.save_steps == 0 or finished
            # Checkpoint steps are always logged, so the counters they store are complete.
            if step % training.logging_steps == 0 or is_save_step:
                totals = statistics.reduce_and_reset()
                elapsed = time.time() - interval_started
                nonfinite_losses += int(totals["nonfinite_losses"])
                loss = totals["loss"]
                record = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "learning_rate": engine.get_lr()[0],
                    "audio_seconds_per_second": totals["audio_seconds"] / elapsed,
                    "padding_fraction": 1 - totals["audio_seconds"] / totals["padded_seconds"],
                    "step_time": elapsed * world_size * accumulation / totals["micro_batches"],
                    "nonfinite_losses": nonfinite_losses,
                    "skipped_steps": engine.skipped_steps,
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "batch_checksum": int(totals["batch_checksum"]),
                }
                if engine.fp16_enabled():
                    record["loss_scale"] = engine.optimizer.loss_scale
                if torch.cuda.is_available():  # the allocator's own count: no device sync
                    record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
                metrics.write(record)
                progress.set_postfix(loss=f"{loss:.3f}")
                interval_started = time.time()
            # Evaluation and checkpoints stay out of the next interval's throughput.
            paused = time.time()
            if eval_plan is not None and step % training.eval_steps == 0:
                run_evaluation()
            if is_save_step:
                save_checkpoint(
                    engine,
                    checkpoint_dir,
                    step,
                    client_state={
                        "sampler": sampler.state_dict(consumed_in_pass=consumed),
                        "step": step,
                        "vocab": vocab,
                        "nonfinite_losses": nonfinite_losses,
                    },
                    trainer_state={
                        "step": step,
                        "total_steps": total_steps,
                        "vocab": vocab,
                        **dataclasses.asdict(layout),
                    },
                    keep=training.save_total_limit,
                )
            interval_started += time.time() - paused
            if finished:
                break
        else:
            epoch += 1

    if eval_plan is not None and step % training.eval_steps != 0:
        run_evaluation()
    digests = module_digests(engine, cpu_group)
    metrics.write({"step": step, "weights_sha256_by_rank": digests})
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    target = export_model(engine, processor, training.output_dir, frozen_fp32)
    # The export must compute what the engine computes: the engine's logits on the first
    # training utterances (a collective under ZeRO-3), then the reloaded export's on rank 0.
    probe = CTCCollator(
        vocab=vocab,
        do_normalize=feature_extractor.do_normalize,
        return_attention_mask=use_attention_mask,
    )([train_set[index] for index in range(min(2, len(train_set)))])
    reference_logits = engine_logits(engine, probe, input_dtype)
    sync_recorder.write(os.path.join(training.output_dir, "sync_debug.json"), is_main)
    progress.close()
    # transformers holds HfDeepSpeedConfig by weak reference and asks it on every forward,
    # and would build the reloaded export partitioned while it lives.
    del hf_deepspeed_config
    if is_main:
        difference = exported_logits_difference(target, probe, reference_logits)
        metrics.write(
            {
                "step": step,
                "export_logits_max_abs_diff": difference,
                "engine_dtype": str(input_dtype),
            }
        )
        print(f"trained {step} steps; model exported to {target} (logits within {difference:.2g})")
    return 0


def _main_with_clear_errors() -> int:
    try:
        return main()
    except (TrainingSetupError, ModelSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RankFailure as error:  # raised on every rank alike: one of them says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main_with_clear_errors())
