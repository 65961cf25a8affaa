"""The Hugging Face way to the first optimizer steps, timed by phase, with per-step records.

Data from --manifest: the data path of transformers' run_speech_recognition_ctc.py in its order
(load_dataset("csv"), `map` text normalization and vocab, `map` decode + resample + features +
tokens into the datasets cache, duration filter); from --dataset (no HF `datasets` needed): our
shards, each item as that `map` stores it. Then `transformers.Trainer` with length-grouped
batches, each step recorded as in our metrics.jsonl. Model, processor and text normalization
are ours: only the data path and the trainer differ. Alone or under torchrun; rank 0 writes:

    HF_DATASETS_CACHE=cache python -m benchmarks.hf_trainer_baseline \
        --manifest corpus/all.tsv --output_dir run --result result.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from train.phase_clock import PhaseClock

SAMPLING_RATE = 16_000
# The bounds our preprocessing rejects outside of (PreprocessArguments' defaults).
MIN_SECONDS, MAX_SECONDS = 0.5, 30.0


# The recipe's map and filter functions, at module level so that datasets fingerprints them stably.


def resolve_paths(batch: dict[str, list], clips: str) -> dict[str, list]:
    """Common Voice on the Hub has absolute paths; the release TSV's are relative to clips/."""
    return {"audio": [os.path.join(clips, path) for path in batch["path"]]}


def normalize_text(batch: dict[str, Any], normalizer: Any) -> dict[str, Any]:
    """The recipe's remove_special_characters, with our normalization so vocabularies match."""
    return {"target_text": normalizer(batch["sentence"])}


def extract_all_chars(batch: dict[str, list]) -> dict[str, list]:
    """The recipe's vocabulary pass: every character of every transcript, one batch."""
    return {"vocab": [sorted(set("".join(batch["target_text"])))]}


def prepare_example(batch: Any, feature_extractor: Any, tokenizer: Any) -> Any:
    """Decode + resample (the Audio feature), normalize to input_values, tokenize the text."""
    sample = batch["audio"]
    inputs = feature_extractor(sample["array"], sampling_rate=sample["sampling_rate"])
    batch["input_values"] = inputs.input_values[0]
    batch["input_length"] = len(batch["input_values"])
    batch["labels"] = tokenizer(batch["target_text"]).input_ids
    return batch


def in_length_range(length: int) -> bool:
    """The recipe's duration filter, with our preprocessing's bounds."""
    return MIN_SECONDS * SAMPLING_RATE < length < MAX_SECONDS * SAMPLING_RATE


def recipe_dataset(
    manifest: Path, output_dir: Path, model_args: Any, num_proc: int | None, clock: PhaseClock
) -> tuple[Any, Any, dict[str, int]]:
    """The recipe's data path from the TSV to the filtered training set: (dataset, processor,
    vocab). benchmarks/preprocess_throughput.py times it as the HF way of preprocessing."""
    import datasets

    from preprocess.text_normalization import TextNormalizer, build_vocab
    from train.wav2vec2_model import build_processor

    raw = datasets.load_dataset(
        "csv", data_files=str(manifest), delimiter="\t", quoting=csv.QUOTE_NONE, split="train"
    )
    raw = raw.map(resolve_paths, batched=True, fn_kwargs={"clips": str(manifest.parent / "clips")})
    clock.mark("load_dataset")
    raw = raw.map(normalize_text, fn_kwargs={"normalizer": TextNormalizer()})
    columns = raw.column_names
    characters = raw.map(
        extract_all_chars, batched=True, batch_size=-1, keep_in_memory=True, remove_columns=columns
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = output_dir / "vocab.json"
    vocab = build_vocab(characters["vocab"][0])
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    processor = build_processor(model_args, str(vocab_file), SAMPLING_RATE)
    clock.mark("text_and_vocab")
    raw = raw.cast_column("audio", datasets.Audio(sampling_rate=SAMPLING_RATE))
    tools = {"feature_extractor": processor.feature_extractor, "tokenizer": processor.tokenizer}
    workers = {"num_proc": num_proc}
    vectorized = raw.map(prepare_example, fn_kwargs=tools, remove_columns=columns, **workers)
    vectorized = vectorized.filter(in_length_range, input_columns=["input_length"], **workers)
    clock.mark("map_decode_resample_features")
    return vectorized, processor, vocab


@dataclass
class ShardFeatures:
    """Our shards as the recipe's training rows; the Trainer reads every item for its lengths."""

    shards: Any
    processor: Any

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.shards[index]
        features = self.processor.feature_extractor(item["audio"], sampling_rate=SAMPLING_RATE)
        labels = self.processor.tokenizer(item["text"]).input_ids
        return {"input_values": features.input_values[0], "labels": labels}


@dataclass
class CTCPaddingCollator:
    """The recipe's DataCollatorCTCWithPadding: pad audio and labels, -100 where padded."""

    processor: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        audio = [{"input_values": feature["input_values"]} for feature in features]
        batch = self.processor.feature_extractor.pad(audio, padding=True, return_tensors="pt")
        labels = [{"input_ids": feature["labels"]} for feature in features]
        labels = self.processor.tokenizer.pad(labels, padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything from imports to the last optimizer step; returns phases and step records."""
    clock = PhaseClock()
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from argument_classes import ModelArguments
    from preprocess.shard_format import ShardDataset
    from train.wav2vec2_model import build_model, build_processor

    clock.mark("imports")
    model_args = ModelArguments(model_name_or_path=args.model)
    if args.manifest:
        recipe = (args.manifest, args.output_dir, model_args, args.num_proc, clock)
        train_set, processor, vocab = recipe_dataset(*recipe)
        lengths = train_set["input_length"]
    else:
        shards = ShardDataset(str(args.dataset))
        vocab_file = os.path.join(shards.path, shards.metadata["vocab"])
        processor = build_processor(model_args, vocab_file, SAMPLING_RATE)
        train_set, vocab = ShardFeatures(shards, processor), shards.vocab
        lengths = shards.audio_lengths
    torch.manual_seed(args.seed)
    model = build_model(model_args, vocab, SAMPLING_RATE)
    clock.mark("model_build")
    # Length-grouped batches; transformers < 5 spells it group_by_length=True.
    grouping = {"train_sampling_strategy": "group_by_length"}
    if "group_by_length" in {field.name for field in fields(TrainingArguments)}:
        grouping = {"group_by_length": True}
    workers = args.dataloader_num_workers
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        length_column_name="input_length",
        # Otherwise the length column is dropped and the sampler reads every row for lengths.
        remove_unused_columns=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
        **grouping,
    )
    # Real and padded samples of the micro-batches since the last optimizer step.
    audio = {"real": 0, "padded": 0}
    steps: list[dict[str, Any]] = []
    losses: dict[int, float] = {}

    class AudioCountingTrainer(Trainer):
        """Counts each batch's audio from its attention mask, still on the host."""

        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            audio["real"] += int(inputs["attention_mask"].sum())
            audio["padded"] += inputs["attention_mask"].numel()
            return super().training_step(model, inputs, *rest, **kw)

    class StepRecorder(TrainerCallback):
        """Each optimizer step's time and audio; the startup phases up to the first step."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock.mark("train_begin")
            self.last = time.perf_counter()

        def on_step_end(self, _: Any, state: Any, __: Any, **___: Any) -> None:
            now = time.perf_counter()
            step_time, self.last = now - self.last, now
            record = {"step": state.global_step, "step_time": step_time}
            record["audio_seconds_per_second"] = audio["real"] / SAMPLING_RATE / step_time
            record["padding_fraction"] = 1 - audio["real"] / audio["padded"]
            if torch.cuda.is_available():  # as our trainer logs it
                record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            steps.append(record)
            audio.update(real=0, padded=0)
            if state.global_step == 1:
                clock.mark("first_optimizer_step")

        def on_log(self, _: Any, state: Any, __: Any, logs: Any = None, **___: Any) -> None:
            if logs and "loss" in logs:
                losses[state.global_step] = logs["loss"]

    trainer = AudioCountingTrainer(
        model=model,
        args=training_args,
        data_collator=CTCPaddingCollator(processor),
        train_dataset=train_set,
        processing_class=processor.feature_extractor,
        callbacks=[StepRecorder()],
    )
    clock.mark("trainer_init")
    trainer.train()
    return {
        "startup_phases": clock.phases,
        "startup_seconds": clock.total(),
        # No phase follows the first step, so the last mark is its end.
        "first_step_unix": clock.last_mark,
        "records": [{**step, "loss": losses.get(step["step"], float("nan"))} for step in steps],
        "rows": len(train_set),
        "audio_hours": sum(lengths) / SAMPLING_RATE / 3600,
        "optimizer": str(training_args.optim),
    }


def run_job(
    work: Path, label: str, options: list[str], torchrun: bool = False, **sampling: Any
) -> dict[str, Any]:
    """This script in a fresh process (under `torchrun --standalone`, 1 rank, if asked) with its
    output in work/label, then removed, sampled with harness.run_sampled's `sampling` options:
    its result, with its process tree's summary as "process" (harness.trainer_run's keys)."""
    from benchmarks import harness

    output = work / label
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m"]
    if torchrun:
        command += ["torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m"]
    command += ["benchmarks.hf_trainer_baseline", "--output_dir", str(output), *options]
    try:
        result, process = harness.run_job(command, work, label, **sampling)
        return {**result, "process": process}
    finally:
        shutil.rmtree(output, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hf_trainer_baseline", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="Common Voice TSV (datasets `map`)")
    source.add_argument("--dataset", type=Path, help="our prepared dataset")
    parser.add_argument("--output_dir", type=Path, required=True, help="Trainer output_dir")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the figures")
    parser.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--num_proc", type=int, default=None, help="map workers")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    if int(os.environ.get("RANK", "0")) == 0:
        args.result.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
