"""Fine-tune wav2vec2 for CTC with DeepSpeed ZeRO on shards made by preprocess/prepare_dataset.py.

    deepspeed --num_gpus 8 train/run_finetuning.py --deepspeed ds_configs/zero2_bf16.json \
        --train_dir data/train --eval_dir data/dev --model_name_or_path facebook/wav2vec2-base \
        --output_dir runs/de
    python -m train.run_finetuning ...      (one process)

main() reads top to bottom: arguments, distributed init, data, model and engine, resume, then the
loop of forward, CTC loss, backward and step, with logging, evaluation and checkpoints at their
intervals, and the export. What it calls lives in modules beside it: batching
(duration_bucket_sampler), collation (ctc_collator), the engine (deepspeed_startup), saving and
resuming (checkpoints), the logged records (step_statistics, metrics_log), evaluation, export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader
from tqdm import tqdm

from argument_classes import DataArguments, FinetuningArguments, ModelArguments, parse_arguments
from preprocess import storage
from preprocess.dataset_cache import DatasetCacheError, cache_dataset, cache_path
from preprocess.shard_format import ShardDataset
from train.checkpoints import (
    CHECKPOINT_DIR,
    CheckpointError,
    TrainState,
    check_output_dir,
    resume_checkpoint,
    save_checkpoint,
    trainer_state_to_resume,
)
from train.ctc_collator import CTCCollator, attention_mask
from train.deepspeed_startup import (
    initialize_engine,
    quiet_harmless_warnings,
    skip_shm_all_reduce_build,
    zero3_model_config,
)
from train.duration_bucket_sampler import DurationBucketSampler
from train.elastic_checkpoint import BatchLayout
from train.evaluation import evaluate, evaluation_batches
from train.free_port import free_port
from train.host_group import RankFailure, host_group, raise_if_any_failed
from train.metrics_log import BatchTrace, MetricsLog
from train.model_export import (
    export_and_verify,
    export_model,
    fp32_state_dict,
    frozen_fp32_parameters,
    module_digests,
    weights_digest,
)
from train.phase_clock import PhaseClock
from train.rng_state import restore_rng_state
from train.step_statistics import StepStatistics, interval_record
from train.sync_debug import SyncRecorder
from train.wav2vec2_model import ModelSetupError, build_model, build_processor

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


class TrainingSetupError(ValueError):
    """Datasets or a DeepSpeed config that cannot work; one line for the user."""


def init_distributed(dataloader_num_workers: int) -> None:
    """Join the launcher's process group; a plain `python` run becomes a group of one.

    NCCL on GPUs, gloo on CPUs, as DeepSpeed's accelerator names them. Each GPU rank binds its
    device before the first collective, so NCCL never puts two ranks on GPU 0.
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )  # fmt: skip
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


def local_dataset_path(uri: str, cache_dir: str | None, group: Any) -> str:
    """The directory to memory-map: `uri` itself, or its node-local cache for s3:// URIs.

    A collective on `group` for remote URIs: local rank 0 of each node brings the node's
    cache up to date (under the cache's own file lock, so other jobs on the node wait for it
    too) while the others wait on a group made for long waits. A failed download stops every
    rank of every node with one line naming the node and the file.
    """
    if not storage.is_remote(uri):
        return uri
    assert cache_dir is not None  # DataArguments requires it
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


def open_datasets(data_args: DataArguments, group: Any) -> tuple[ShardDataset, ShardDataset | None]:
    """The train set and the eval set (None without --eval_dir), refused in one line where they
    do not fit together; a collective on `group` for remote URIs (local_dataset_path)."""
    cache_dir = data_args.cache_dir
    try:
        train_set = ShardDataset(local_dataset_path(data_args.train_dir, cache_dir, group))
        eval_set = (
            ShardDataset(local_dataset_path(data_args.eval_dir, cache_dir, group))
            if data_args.eval_dir
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


def batch_layout(
    saved: dict[str, Any] | None,
    world_size: int,
    data_args: DataArguments,
    finetuning_args: FinetuningArguments,
) -> BatchLayout:
    """How this run splits its global batch over ranks, accumulation and micro-batches.

    As asked on a fresh run. A resumed run keeps the global batch its checkpoint was trained
    with and splits it for this world size, no micro-batch over --max_batch_seconds
    (`BatchLayout.for_world_size`); rank 0 says so when that differs from what was asked.
    """
    asked = BatchLayout(
        world_size, finetuning_args.gradient_accumulation_steps, data_args.max_batch_seconds
    )
    if saved is None:
        return asked
    planned = BatchLayout(
        saved["world_size"],
        saved.get("gradient_accumulation_steps", asked.gradient_accumulation_steps),
        saved.get("max_batch_seconds", asked.max_batch_seconds),
    )
    layout = planned.for_world_size(world_size, data_args.max_batch_seconds)
    if layout != asked and dist.get_rank() == 0:
        print(
            f"resuming a run of {planned.global_batch_seconds:g} audio seconds per step on "
            f"{world_size} ranks (it was {planned.world_size}): gradient_accumulation_steps "
            f"{layout.gradient_accumulation_steps}, max_batch_seconds "
            f"{layout.max_batch_seconds:.6g}",
            flush=True,
        )
    return layout


def train_sampler(
    train_set: ShardDataset, layout: BatchLayout, rank: int, num_buckets: int, seed: int
) -> DurationBucketSampler:
    """This rank's sampler of the train set, each step split as `layout` says. Epoch 0 is planned
    here, so a train set too small for one step is refused in one line before any model."""
    sampler = DurationBucketSampler(
        audio_lengths=train_set.audio_lengths,
        sampling_rate=train_set.sampling_rate,
        max_batch_seconds=layout.max_batch_seconds,
        world_size=layout.world_size,
        rank=rank,
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
        num_buckets=num_buckets,
        seed=seed,
    )
    try:
        sampler.plan_epoch(0)
    except ValueError as error:
        raise TrainingSetupError(str(error)) from None
    return sampler


def deepspeed_config(
    finetuning_args: FinetuningArguments,
    total_steps: int,
    accumulation: int,
    load_universal: bool,
) -> dict[str, Any]:
    """The chosen ds_configs file with this run's values filled in (the launcher's one truth).

    A path that does not exist from the current directory is looked up among the shipped
    configs by name, so `--deepspeed zero2_bf16.json` works from anywhere. `load_universal`:
    the checkpoint to resume was written by another number of ranks (train.elastic_checkpoint).
    """
    path = finetuning_args.deepspeed
    shipped = SHIPPED_CONFIGS / os.path.basename(path)
    if not os.path.exists(path) and shipped.is_file():
        path = str(shipped)
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        message = f"cannot read DeepSpeed config {finetuning_args.deepspeed}: {error}"
        raise TrainingSetupError(message) from None
    # Batches hold a variable number of utterances; DeepSpeed only counts micro-batches.
    config["train_micro_batch_size_per_gpu"] = 1
    config["gradient_accumulation_steps"] = accumulation
    config.pop("train_batch_size", None)
    config["gradient_clipping"] = finetuning_args.max_grad_norm
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer["params"].update(
        lr=finetuning_args.learning_rate, weight_decay=finetuning_args.weight_decay
    )
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
            "warmup_max_lr": finetuning_args.learning_rate,
            # DeepSpeed rejects zero warmup steps and a decay shorter than the warmup.
            "warmup_num_steps": max(1, min(finetuning_args.warmup_steps, total_steps - 1)),
            "total_num_steps": max(total_steps, 2),
            "warmup_type": "linear",
        },
    }
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        raise TrainingSetupError(f"zero_optimization.stage must be 1, 2 or 3, got {stage}")
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


class IdentifiedCollator:
    """Collates and keeps the utterance ids, so logs and traces show which data a step saw."""

    def __init__(self, collator: CTCCollator) -> None:
        self.collator = collator

    def __call__(self, items: list[dict[str, Any]]) -> tuple[list[str], dict[str, torch.Tensor]]:
        return [item["id"] for item in items], self.collator(items)


def model_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype, with_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A collated batch's input values on `device` in `dtype`, and its attention mask there (None
    unless `with_mask`: models whose feature extractor makes none take none).

    Copied, then cast on the device: a cast on the host would copy synchronously. The mask is
    built on the device from the lengths, so it never crosses over itself.
    """
    input_values = batch["input_values"].to(device, non_blocking=True).to(dtype)
    if not with_mask:
        return input_values, None
    return input_values, attention_mask(batch["input_lengths"], input_values.shape[1], device)


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


def main(argv: list[str] | None = None) -> int:
    """The run, top to bottom (module docstring); returns the exit status."""
    # Arguments: every value is checked as it is parsed; a refusal is one line, before any work.
    model_args, data_args, finetuning_args = parse_arguments(
        (ModelArguments, DataArguments, FinetuningArguments), sys.argv[1:] if argv is None else argv
    )
    startup = PhaseClock()
    startup.mark("imports")
    output_dir = finetuning_args.output_dir
    resuming = finetuning_args.resume or finetuning_args.export_only
    check_output_dir(output_dir, resuming)

    # Distributed: the launcher's process group, or one of a single process.
    init_distributed(data_args.dataloader_num_workers)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    # Object collectives (cache and conversion waits, evaluation transcripts) run on gloo
    # whatever the device backend, with a timeout fit for downloads.
    cpu_group = host_group()
    startup.mark("distributed_init")

    # Data: open the memory-mapped shards and plan every batch from the length index alone.
    train_set, eval_set = open_datasets(data_args, cpu_group)
    vocab = train_set.vocab
    checkpoint_dir = os.path.join(output_dir, CHECKPOINT_DIR)
    saved = (
        trainer_state_to_resume(checkpoint_dir, vocab, data_args.train_dir) if resuming else None
    )
    layout = batch_layout(saved, world_size, data_args, finetuning_args)
    accumulation = layout.gradient_accumulation_steps
    sampler = train_sampler(train_set, layout, rank, data_args.num_buckets, finetuning_args.seed)
    steps_per_epoch = len(sampler.plan_epoch(0)) // accumulation
    max_steps, num_train_epochs = finetuning_args.max_steps, finetuning_args.num_train_epochs
    # The schedule spans the steps planned when the run began (or --max_steps). An elastic
    # resume keeps the global batch, so its steps per epoch, and thus that total, still hold.
    total_steps = (
        max_steps
        or (saved and saved["total_steps"])
        or math.ceil(steps_per_epoch * num_train_epochs)
    )
    # A run of whole epochs ends with its last epoch, not at a step count: a re-planned epoch
    # may come out a step short or long of the plan it replaced, and must still finish once.
    whole_epochs = not max_steps and float(num_train_epochs).is_integer()
    epochs = math.ceil(num_train_epochs) if not max_steps else math.inf
    startup.mark("dataset_open_and_batch_plan")

    # Model: built while ZeRO-3's HfDeepSpeedConfig lives (kept until the export), then the
    # engine. A checkpoint written by another number of ranks loads in its universal form.
    elastic = saved is not None and saved["world_size"] != world_size
    ds_config = deepspeed_config(finetuning_args, total_steps, accumulation, load_universal=elastic)
    hf_deepspeed_config = zero3_model_config(ds_config)
    torch.manual_seed(finetuning_args.seed)
    vocab_file = os.path.join(train_set.path, train_set.metadata["vocab"])
    processor = build_processor(model_args, vocab_file, train_set.sampling_rate)
    model = build_model(model_args, vocab, train_set.sampling_rate)
    # Frozen weights have no fp32 master copy in DeepSpeed and are cast to bf16/fp16 with the
    # module; the export takes them from here, at the precision they were loaded with.
    frozen_fp32 = frozen_fp32_parameters(model)
    startup.mark("model_build")
    engine, input_dtype = initialize_engine(model, ds_config)
    startup.mark("deepspeed_initialize")

    # Resume: weights, optimizer and schedule, then the loop's position and the generators.
    step, epoch, nonfinite_losses = 0, 0, 0
    resumed_rng = resumed_digest = None
    if saved is not None:
        resumed, resumed_rng = resume_checkpoint(
            engine, checkpoint_dir, saved, sampler, cpu_group, universal=elastic
        )
        step, epoch, nonfinite_losses = resumed.step, resumed.epoch, resumed.nonfinite_losses
        if finetuning_args.trace_batches:  # an audit of what was loaded; a collective
            resumed_digest = weights_digest(fp32_state_dict(engine, frozen_fp32))
    if finetuning_args.export_only:
        target = export_model(engine, processor, output_dir, frozen_fp32)
        if is_main:
            print(f"exported step {step} to {target}")
        return 0

    # Loop setup: the loader, the evaluation's batches, the logs.
    feature_extractor = processor.feature_extractor
    use_attention_mask = feature_extractor.return_attention_mask
    collator = CTCCollator(vocab=vocab, do_normalize=feature_extractor.do_normalize)
    blank_id = engine.module.config.pad_token_id
    frames_of = engine.module._get_feat_extract_output_lengths  # utterance samples -> frames
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
        eval_lengths = eval_set.audio_lengths[: data_args.max_eval_utterances or None]
        eval_plan = evaluation_batches(
            eval_lengths, eval_set.sampling_rate, data_args.max_batch_seconds, world_size
        )
    os.makedirs(output_dir, exist_ok=True)
    metrics = MetricsLog(output_dir, enabled=is_main)
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
    batch_trace = BatchTrace(output_dir, rank, enabled=finetuning_args.trace_batches)
    sync_recorder = SyncRecorder.from_environment()
    layerdrop = getattr(engine.module, "synced_layerdrop", None)
    # What each checkpoint's trainer_state.json records beside its step.
    run_plan = {"total_steps": total_steps, "vocab": vocab, **dataclasses.asdict(layout)}
    if resumed_digest is not None:
        metrics.write({"step": step, "resumed_fp32_sha256": resumed_digest})
    interval_started = time.time()
    engine.train()
    finished = not whole_epochs and step >= total_steps
    while epoch < epochs and not finished:
        sampler.set_epoch(epoch)
        # Each micro-step's target tokens over all ranks, known from the plan without talking.
        plan_targets = sampler.micro_step_totals(train_set.text_lengths, epoch)
        first_micro_step = sampler.state_dict(consumed_in_pass=0)["consumed_micro_steps"]
        for consumed, (ids, batch) in enumerate(loader, start=1):
            # Position: the micro-step, and the target tokens of its step over all ranks.
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

            # Forward, loss, backward, step (DeepSpeed steps the optimizer every `accumulation`).
            with sync_recorder.watch():
                inputs, mask = model_inputs(batch, engine.device, input_dtype, use_attention_mask)
                labels = batch["labels"].to(engine.device, non_blocking=True)
                input_frames = frames_of(batch["input_lengths"])
                if layerdrop is not None:
                    layerdrop.reseed(finetuning_args.seed, step, micro_step)
                logits = engine(inputs, attention_mask=mask).logits
                loss_sum = ctc_loss_sum(
                    logits, labels, input_frames, batch["target_lengths"], blank_id
                )
                # DeepSpeed averages gradients over ranks: scaled by world_size, the update is the
                # step's summed loss over its target tokens on all ranks. A non-finite loss makes
                # non-finite gradients; DeepSpeed's gradient-norm check then skips the step on
                # every rank, weights and optimizer untouched (engine.skipped_steps), no sync here.
                engine.backward(loss_sum * world_size / step_targets, scale_wrt_gas=False)
                engine.step()
                statistics.add_loss(loss_sum, int(batch["target_lengths"].sum()))
            statistics.add_batch(
                audio_seconds=int(batch["input_lengths"].sum()) / train_set.sampling_rate,
                padded_seconds=batch["input_values"].numel() / train_set.sampling_rate,
                checksum=zlib.crc32("\n".join(ids).encode()),
            )
            batch_trace.write(step + 1, micro_step, epoch, ids)
            if (micro_step + 1) % accumulation:
                continue

            # Step boundary: count the step; is it the run's last?
            step += 1
            progress.update(1)
            if step == 1:
                startup.mark("first_optimizer_step")
                if is_main:
                    startup.write(os.path.join(output_dir, "startup.json"))
            if whole_epochs:
                finished = epoch + 1 == epochs and micro_step + 1 == len(plan_targets)
            else:
                finished = step >= total_steps
            is_save_step = step % finetuning_args.save_steps == 0 or finished

            # Log: checkpoint steps always, so the counters they store are complete.
            if step % finetuning_args.logging_steps == 0 or is_save_step:
                totals = statistics.reduce_and_reset()
                nonfinite_losses += int(totals["nonfinite_losses"])
                record = interval_record(
                    totals, engine, step=step, epoch=epoch,
                    seconds=time.time() - interval_started,
                    micro_batches_per_step=world_size * accumulation,
                    nonfinite_losses=nonfinite_losses,
                )  # fmt: skip
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.3f}")
                interval_started = time.time()

            # Evaluate and save, outside the next interval's throughput.
            paused = time.time()
            if eval_plan is not None and step % finetuning_args.eval_steps == 0:
                run_evaluation()
            if is_save_step:
                state = TrainState(
                    step, sampler.state_dict(consumed_in_pass=consumed), nonfinite_losses
                )
                save_checkpoint(
                    engine, checkpoint_dir, state, run_plan, keep=finetuning_args.save_total_limit
                )
            interval_started += time.time() - paused
            if finished:
                break
        else:
            epoch += 1

    # Final evaluation, unless the last step had one.
    if eval_plan is not None and step % finetuning_args.eval_steps != 0:
        run_evaluation()
    progress.close()
    sync_recorder.write(os.path.join(output_dir, "sync_debug.json"), is_main)

    # Export: the ranks agree on the weights, and the export computes what the engine does.
    digests = module_digests(engine, cpu_group)
    metrics.write({"step": step, "weights_sha256_by_rank": digests})
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks ended with different weights: {digests}")
    exported = export_and_verify(
        engine,
        processor,
        output_dir=output_dir,
        frozen_fp32=frozen_fp32,
        probe_items=[train_set[index] for index in range(min(2, len(train_set)))],
        vocab=vocab,
        input_dtype=input_dtype,
        zero3_config=hf_deepspeed_config,
    )
    if exported is not None:  # rank 0
        target, difference = exported
        check = {"export_logits_max_abs_diff": difference, "engine_dtype": str(input_dtype)}
        metrics.write({"step": step, **check})
        print(f"trained {step} steps; model exported to {target} (logits within {difference:.2g})")
    return 0


def _main_with_clear_errors() -> int:
    try:
        return main()
    except (TrainingSetupError, CheckpointError, ModelSetupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RankFailure as error:  # raised on every rank alike: one of them says it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main_with_clear_errors())
