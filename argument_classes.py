"""Argument dataclasses of both scripts, parsed with `transformers.HfArgumentParser`.

One module so that a JSON or YAML file of arguments can configure either script, and so the
options a dataset was built with (recorded in its dataset.json) read like the command line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preprocess.text_normalization import DEFAULT_CHARS_TO_DROP


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
    chars_to_drop: str = field(
        default=DEFAULT_CHARS_TO_DROP,
        metadata={"help": "Regex character class removed from transcripts (replaced by space)."},
    )
    max_shard_bytes: int = field(
        default=512 * 1024 * 1024, metadata={"help": "A shard file rolls over past this size."}
    )
    rows_per_task: int = field(
        default=256,
        metadata={
            "help": "Manifest rows per Ray task; each task decodes and writes its own shards."
        },
    )
    decode_batch_size: int = field(
        default=32, metadata={"help": "Rows decoded per map_batches call inside a task."}
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
