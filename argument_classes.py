"""Argument dataclasses of both scripts, parsed with `transformers.HfArgumentParser`.

One module so that a JSON or YAML file of arguments can configure either script, and so the
options a dataset was built with (recorded in its dataset.json) read like the command line.
Each dataclass checks its values as it is built (`__post_init__`), so a value that cannot work
is refused before any work, whether it came from options, a file, or code.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from preprocess import storage


class ArgumentError(ValueError):
    """An argument value that cannot work; parse_arguments reports it as one `error:` line."""


def _require_positive(**values: float | None) -> None:
    """Refuses the first of `values` not above 0, by its option name; None (unset) passes."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ArgumentError(f"--{name} must be positive, got {value}")


@dataclass
class ManifestArguments:
    """Where the audio and transcripts come from."""

    manifest: str = field(
        metadata={
            "help": "Common Voice TSV, or any CSV/TSV/JSONL manifest; local path or s3:// URI."
        }
    )
    audio_column: str | None = field(
        default=None,
        metadata={"help": "Column with the audio path (default: 'path' for Common Voice TSVs)."},
    )
    text_column: str | None = field(
        default=None,
        metadata={"help": "Column with the transcript (default: 'sentence' for Common Voice)."},
    )
    id_column: str | None = field(
        default=None,
        metadata={"help": "Column with a unique row id (default: the audio path as written)."},
    )
    audio_root: str | None = field(
        default=None,
        metadata={
            "help": "Directory or s3:// prefix relative audio paths are resolved against "
            "(default: clips/ beside a Common Voice TSV, else the manifest's directory)."
        },
    )
    passthrough_columns: list[str] | None = field(
        default=None,
        metadata={
            "help": "Manifest columns copied into the shards as metadata "
            "(default: client_id, gender, age, accents, locale where present)."
        },
    )


@dataclass
class PreprocessArguments:
    """What the shards hold and how they are made."""

    output_dir: str = field(metadata={"help": "Dataset directory to create or extend (or s3://)."})
    sampling_rate: int = field(default=16000, metadata={"help": "Target sample rate in Hz."})
    min_duration_seconds: float = field(
        default=0.5, metadata={"help": "Shorter utterances are rejected as too short."}
    )
    max_duration_seconds: float = field(
        default=30.0, metadata={"help": "Longer utterances are rejected as too long."}
    )
    lowercase: bool = field(default=True, metadata={"help": "Lowercase transcripts."})
    keep_apostrophes: bool = field(
        default=False,
        metadata={
            "help": "Keep an apostrophe between two letters (don't, l'homme; ’ and ʼ become "
            "'); other punctuation and symbols of every script are always dropped."
        },
    )
    chars_to_drop: str = field(
        default="",
        metadata={
            "help": "Regular expression, e.g. a character class, whose matches are also "
            "replaced by a space in transcripts (default: none)."
        },
    )
    max_shard_bytes: int = field(
        default=512 * 1024 * 1024, metadata={"help": "A shard file rolls over past this size."}
    )
    rows_per_task: int = field(
        default=1024,
        metadata={
            "help": "At most this many manifest rows per Ray task (fewer on small corpora, so "
            "every CPU gets several tasks); each task decodes and writes its own shards."
        },
    )
    decode_batch_size: int = field(
        default=32,
        metadata={"help": "Rows a task decodes before writing them as one Arrow record batch."},
    )
    ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join (default: RAY_ADDRESS, else a local instance)."},
    )
    num_cpus: int | None = field(
        default=None, metadata={"help": "CPUs of the local Ray instance (default: all)."}
    )
    object_store_memory: int | None = field(
        default=None, metadata={"help": "Object store bytes of the local Ray instance."}
    )

    def __post_init__(self) -> None:
        _require_positive(sampling_rate=self.sampling_rate)
        if not 0 <= self.min_duration_seconds < self.max_duration_seconds:
            raise ArgumentError(
                "--min_duration_seconds must be >= 0 and below --max_duration_seconds "
                f"(got {self.min_duration_seconds} and {self.max_duration_seconds})"
            )
        _require_positive(
            max_shard_bytes=self.max_shard_bytes,
            rows_per_task=self.rows_per_task,
            decode_batch_size=self.decode_batch_size,
        )


@dataclass
class ModelArguments:
    """Which wav2vec2 to fine-tune and how."""

    model_name_or_path: str = field(
        metadata={
            "help": "Local model directory, hub id, a preset (tiny, base, large) built with "
            "random weights, or a Wav2Vec2Config JSON file."
        }
    )
    freeze_feature_encoder: bool | None = field(
        default=None,
        metadata={
            "help": "Keep the convolutional feature encoder frozen (default: frozen only when "
            "pretrained weights were loaded; a random-init encoder has to learn)."
        },
    )
    layerdrop: float = field(
        default=0.0,
        metadata={"help": "Probability of skipping a transformer layer; the same on every rank."},
    )
    mask_time_prob: float = field(
        default=0.05, metadata={"help": "SpecAugment time-masking probability."}
    )
    hidden_dropout: float = field(default=0.0, metadata={"help": "Transformer dropout."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Attention dropout."})


@dataclass
class DataArguments:
    """The prepared datasets and how batches are cut from them."""

    train_dir: str = field(metadata={"help": "Dataset directory made by prepare_dataset."})
    eval_dir: str | None = field(
        default=None, metadata={"help": "Dataset directory evaluated every --eval_steps."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Node-local directory for s3:// train_dir/eval_dir (required for them): one "
            "rank per node downloads the shards there, each checked against dataset.json's "
            "sha256, and later runs reuse what is already there."
        },
    )
    max_batch_seconds: float = field(
        default=200.0,
        metadata={"help": "Budget of padded audio seconds in one micro-batch on one rank."},
    )
    num_buckets: int = field(default=30, metadata={"help": "Duration buckets for batching."})
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "DataLoader workers reading the memory-mapped shards."}
    )
    max_eval_utterances: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many utterances."}
    )

    def __post_init__(self) -> None:
        _require_positive(max_batch_seconds=self.max_batch_seconds)
        remote = [uri for uri in (self.train_dir, self.eval_dir) if uri and storage.is_remote(uri)]
        if remote and not self.cache_dir:
            raise ArgumentError(
                f"{remote[0]} is in object storage: pass --cache_dir, a node-local directory to "
                "cache its shards in (they are memory-mapped)"
            )


@dataclass
class FinetuningArguments:
    """The loop: steps, optimizer, checkpoints, logging."""

    output_dir: str = field(metadata={"help": "Checkpoints, logs and the exported model."})
    deepspeed: str = field(
        default="ds_configs/zero2_bf16.json", metadata={"help": "DeepSpeed config file."}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=500, metadata={"help": "Linear warmup steps."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps in total (default: from epochs)."}
    )
    num_train_epochs: float = field(default=30.0, metadata={"help": "Epochs, if no max_steps."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per rank in one optimizer step."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=42, metadata={"help": "Seeds the model init and the batch plan."})
    logging_steps: int = field(default=10, metadata={"help": "Metrics every this many steps."})
    eval_steps: int = field(default=500, metadata={"help": "Evaluate every this many steps."})
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept (the last K)."})
    resume: bool = field(
        default=False, metadata={"help": "Continue from the latest checkpoint in output_dir."}
    )
    trace_batches: bool = field(
        default=False,
        metadata={
            "help": "Append each micro-batch's utterance ids to OUTPUT/batch_trace/rank{R}.jsonl "
            "as {step, micro_step, epoch, ids}, on every rank and across resumes, to audit a run."
        },
    )
    export_only: bool = field(
        default=False,
        metadata={"help": "Load the latest checkpoint, export OUTPUT/model, and exit."},
    )
    local_rank: int = field(
        default=-1, metadata={"help": "Set by the deepspeed launcher; leave alone."}
    )

    def __post_init__(self) -> None:
        _require_positive(
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            logging_steps=self.logging_steps,
            eval_steps=self.eval_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            learning_rate=self.learning_rate,
            max_steps=self.max_steps,
        )


def parse_arguments(classes: tuple[type, ...], argv: list[str]) -> tuple[Any, ...]:
    """Instances of `classes` from command-line options, or from one JSON or YAML file of them.

    The deepspeed launcher adds `--local_rank=N` in front of a script's own arguments (it is in
    the environment too, as LOCAL_RANK), so a file of arguments may come with it.

    A value the dataclasses refuse (ArgumentError, from their `__post_init__`) ends the process
    before any work, with exit status 2 as argparse's own refusals, and one `error: ...` line on
    stderr as both scripts report every other refusal.
    """
    # Imported here: preprocessing's Ray workers import this module and never need transformers.
    from transformers import HfArgumentParser

    parser = HfArgumentParser(classes)
    own = [arg for arg in argv if not arg.startswith("--local_rank")]
    try:
        if len(own) == 1 and own[0].endswith(".json"):
            return parser.parse_json_file(own[0])
        if len(own) == 1 and own[0].endswith((".yaml", ".yml")):
            return parser.parse_yaml_file(own[0])
        return parser.parse_args_into_dataclasses(args=argv)
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
