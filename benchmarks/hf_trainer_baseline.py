"""The Hugging Face way from a Common Voice TSV to the first optimizer step, timed by phase.

Follows transformers' examples/pytorch/speech-recognition/run_speech_recognition_ctc.py in its
order: load_dataset("csv") on the TSV; normalize the transcripts and build the character vocab
with `map`; build the model; cast the audio column to 16 kHz and `map` decode + resample +
Wav2Vec2FeatureExtractor + tokenizer into input_values, input_length and labels (num_proc
workers, written to the datasets cache); filter by duration; then `transformers.Trainer` with
length-grouped sampling on the input_length column, stopped after its first optimizer step.

The model, feature extractor, tokenizer and text normalization are this project's (the `tiny`
preset by default), so only the data path and the trainer differ from ours. Run by
benchmarks/startup_time.py in a fresh process with HF_DATASETS_CACHE pointing at an empty
(cold) or already filled (warm) cache:

    HF_DATASETS_CACHE=cache python -m benchmarks.hf_trainer_baseline \
        --manifest corpus/all.tsv --output_dir run --result result.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psutil

SAMPLING_RATE = 16_000
# The bounds our preprocessing rejects outside of (PreprocessArguments' defaults).
MIN_SECONDS, MAX_SECONDS = 0.5, 30.0


def length_grouping(training_arguments: type) -> dict[str, Any]:
    """The TrainingArguments option for length-grouped batches, under either spelling.

    transformers < 5 calls it group_by_length=True; 5.x train_sampling_strategy.
    """
    names = {field.name for field in fields(training_arguments)}
    if "group_by_length" in names:
        return {"group_by_length": True}
    return {"train_sampling_strategy": "group_by_length"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hf_trainer_baseline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--manifest", type=Path, required=True, help="Common Voice TSV")
    parser.add_argument("--output_dir", type=Path, required=True, help="Trainer output_dir")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the phases")
    parser.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument(
        "--num_proc",
        type=int,
        default=None,
        help="map workers (the recipe's preprocessing_num_workers)",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


class PhaseClock:
    """Seconds per phase since process creation, the same origin as ours' startup.json."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = psutil.Process().create_time()

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases[phase] = now - self._last
        self._last = now


# --- The recipe's map/filter functions; module level so datasets fingerprints them stably ------


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


@dataclass
class CTCPaddingCollator:
    """The recipe's DataCollatorCTCWithPadding: pad audio and labels, -100 where padded."""

    feature_extractor: Any
    tokenizer: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        audio = [{"input_values": feature["input_values"]} for feature in features]
        batch = self.feature_extractor.pad(audio, padding=True, return_tensors="pt")
        labels = self.tokenizer.pad(
            [{"input_ids": feature["labels"]} for feature in features],
            padding=True,
            return_tensors="pt",
        )
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"].ne(1), -100)
        return batch


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything from imports to the first optimizer step; returns the phases and sizes."""
    clock = PhaseClock()
    import datasets
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from argument_classes import ModelArguments
    from preprocess.text_normalization import TextNormalizer, build_vocab
    from train.wav2vec2_model import build_model, build_processor

    clock.mark("imports")

    raw = datasets.load_dataset(
        "csv",
        data_files=str(args.manifest),
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        split="train",
    )
    raw = raw.map(
        resolve_paths, batched=True, fn_kwargs={"clips": str(args.manifest.parent / "clips")}
    )
    clock.mark("load_dataset")

    raw = raw.map(normalize_text, fn_kwargs={"normalizer": TextNormalizer()})
    characters = raw.map(
        extract_all_chars,
        batched=True,
        batch_size=-1,
        keep_in_memory=True,
        remove_columns=raw.column_names,
    )
    vocab = build_vocab(characters["vocab"][0])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = args.output_dir / "vocab.json"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    clock.mark("text_and_vocab")

    model_args = ModelArguments(model_name_or_path=args.model)
    processor = build_processor(model_args, str(vocab_file), SAMPLING_RATE)
    torch.manual_seed(args.seed)
    model = build_model(model_args, vocab, SAMPLING_RATE)
    clock.mark("model_build")

    raw = raw.cast_column("audio", datasets.Audio(sampling_rate=SAMPLING_RATE))
    vectorized = raw.map(
        prepare_example,
        fn_kwargs={
            "feature_extractor": processor.feature_extractor,
            "tokenizer": processor.tokenizer,
        },
        remove_columns=raw.column_names,
        num_proc=args.num_proc,
    )
    vectorized = vectorized.filter(
        in_length_range, input_columns=["input_length"], num_proc=args.num_proc
    )
    clock.mark("map_decode_resample_features")

    grouping = length_grouping(TrainingArguments)
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
        dataloader_num_workers=args.dataloader_num_workers,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        disable_tqdm=True,
        **grouping,
    )

    class PhaseCallback(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock.mark("train_begin")

        def on_step_end(self, _: Any, state: Any, control: Any, **__: Any) -> None:
            if state.global_step == 1:
                clock.mark("first_optimizer_step")
                control.should_training_stop = True

    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=CTCPaddingCollator(processor.feature_extractor, processor.tokenizer),
        train_dataset=vectorized,
        processing_class=processor.feature_extractor,
        callbacks=[PhaseCallback()],
    )
    clock.mark("trainer_init")
    trainer.train()
    return {
        "phases": clock.phases,
        "total": sum(clock.phases.values()),
        "rows": len(vectorized),
        "audio_hours": sum(vectorized["input_length"]) / SAMPLING_RATE / 3600,
        "vocab_size": len(vocab),
        "datasets_version": datasets.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    args.result.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
