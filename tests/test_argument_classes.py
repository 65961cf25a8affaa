"""Argument values are checked as the dataclasses are built; a refused one is one `error:` line
and exit status 2, from options or from a JSON or YAML file, in both scripts, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from espeak_audio import REPO_ROOT

from argument_classes import (
    ArgumentError,
    DataArguments,
    FinetuningArguments,
    ManifestArguments,
    ModelArguments,
    PreprocessArguments,
    parse_arguments,
)

TRAINING = (ModelArguments, DataArguments, FinetuningArguments)


@pytest.mark.parametrize(
    ("arguments", "options", "message"),
    [
        (PreprocessArguments, {"sampling_rate": 0}, "--sampling_rate must be positive, got 0"),
        (PreprocessArguments, {"max_shard_bytes": -1}, "--max_shard_bytes must be positive, got"),
        (PreprocessArguments, {"rows_per_task": 0}, "--rows_per_task must be positive, got 0"),
        (PreprocessArguments, {"decode_batch_size": 0}, "--decode_batch_size must be positive"),
        (PreprocessArguments, {"min_duration_seconds": -0.5}, "(got -0.5 and 30.0)"),
        (PreprocessArguments, {"min_duration_seconds": 3, "max_duration_seconds": 3},
         "--min_duration_seconds must be >= 0 and below --max_duration_seconds (got 3 and 3)"),
        (DataArguments, {"max_batch_seconds": 0.0}, "--max_batch_seconds must be positive, got 0"),
        (DataArguments, {"train_dir": "s3://b/train"}, "s3://b/train is in object storage: pass"),
        (DataArguments, {"eval_dir": "s3://b/dev"}, "s3://b/dev is in object storage"),
        (FinetuningArguments, {"learning_rate": 0.0}, "--learning_rate must be positive, got 0.0"),
        (FinetuningArguments, {"learning_rate": float("nan")}, "--learning_rate must be positive"),
        (FinetuningArguments, {"max_steps": 0}, "--max_steps must be positive, got 0"),
        (FinetuningArguments, {"save_total_limit": 0}, "--save_total_limit must be positive"),
        (FinetuningArguments, {"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps"),
        (FinetuningArguments, {"logging_steps": -1}, "--logging_steps must be positive, got -1"),
        (FinetuningArguments, {"eval_steps": 0}, "--eval_steps must be positive"),
        (FinetuningArguments, {"save_steps": 0}, "--save_steps must be positive"),
    ],
)  # fmt: skip
def test_values_that_cannot_work_are_refused_as_they_are_built(arguments, options, message):
    required = {"train_dir": "data"} if arguments is DataArguments else {"output_dir": "out"}
    with pytest.raises(ArgumentError) as refusal:
        arguments(**{**required, **options})
    assert message in str(refusal.value)


def test_defaults_and_unset_options_pass():
    PreprocessArguments("out")
    DataArguments("s3://bucket/train", cache_dir="/cache")
    assert FinetuningArguments("out").max_steps is None


@pytest.mark.parametrize("source", ["options", "json", "yaml"])
def test_a_refused_value_is_one_error_line_and_exit_status_2(source, tmp_path, capsys):
    options = {"model_name_or_path": "tiny", "train_dir": "data", "output_dir": "out"}
    options["max_batch_seconds"] = 0
    argv = [f"--{key}={value}" for key, value in options.items()]
    if source != "options":
        path = tmp_path / f"args.{source}"
        path.write_text(json.dumps(options))  # JSON is YAML too
        argv = ["--local_rank=0", str(path)]
    with pytest.raises(SystemExit) as exit:
        parse_arguments(TRAINING, argv)
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --max_batch_seconds must be positive, got 0" + (".0" if source == "options" else "")
    ]


@pytest.mark.parametrize(
    ("module", "options", "message"),
    [
        (
            "train.run_finetuning",
            ["--model_name_or_path=tiny", "--train_dir=/nonexistent", "--output_dir=out"],
            "error: --learning_rate must be positive, got 0.0",
        ),
        (
            "preprocess.prepare_dataset",
            ["--manifest=/nonexistent.tsv", "--output_dir=out"],
            "error: --rows_per_task must be positive, got 0",
        ),
    ],
)
def test_both_scripts_refuse_in_one_line_before_any_work(module, options, message, tmp_path):
    bad = "--learning_rate=0" if module == "train.run_finetuning" else "--rows_per_task=0"
    result = subprocess.run(
        [sys.executable, "-m", module, *options, bad],
        cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [message], result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing made: the refusal came first


def test_manifest_arguments_need_no_checks():
    assert ManifestArguments("corpus.tsv").audio_column is None
