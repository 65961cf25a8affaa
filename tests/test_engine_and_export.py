"""The engine as the trainer builds it, and its export checked against it: real DeepSpeed engines
on the tiny wav2vec2 in a process group of one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param
from one_rank_group import deepspeed_config, engine_of, process_group_of_one
from safetensors.torch import load_file
from transformers.integrations import is_deepspeed_zero3_enabled

from argument_classes import ModelArguments
from train.deepspeed_startup import zero3_model_config
from train.model_export import export_and_verify, fp32_state_dict, frozen_fp32_parameters
from train.wav2vec2_model import build_model, build_processor

VOCAB = {"[PAD]": 0, "[UNK]": 1, "|": 2, "a": 3, "b": 4}


@pytest.fixture
def one_rank(monkeypatch):
    """Rank 0 of a process group of one, as DeepSpeed's launcher would describe it."""
    process_group_of_one()
    monkeypatch.setenv("LOCAL_RANK", "0")


def utterances(count: int) -> list[dict]:
    """Items as ShardDataset gives them: audio of different lengths, and a transcript."""
    rng = np.random.default_rng(0)
    return [
        {"audio": rng.standard_normal(4000 + 800 * index).astype(np.float32), "text": "ab a"}
        for index in range(count)
    ]


@pytest.mark.parametrize(
    ("config", "dtype"), [("zero2_fp32.json", torch.float32), ("zero2_bf16.json", torch.bfloat16)]
)
def test_the_engine_optimizes_the_trainable_parameters_in_its_dtype(one_rank, config, dtype):
    model = build_model(ModelArguments("tiny", freeze_feature_encoder=True), VOCAB, 16000)
    engine, input_dtype = engine_of(model, config)
    assert input_dtype == dtype == next(engine.module.parameters()).dtype
    # An fp32 master copy, which the optimizer updates, for the trainable parameters alone.
    parameters = list(engine.module.parameters())
    assert any(not p.requires_grad for p in parameters)
    for parameter in parameters:
        assert (safe_get_full_fp32_param(parameter) is not None) == parameter.requires_grad


def test_zero3_config_is_set_for_stage_3_alone():
    assert zero3_model_config(deepspeed_config("zero2_fp32.json")) is None
    config = zero3_model_config(deepspeed_config("zero3_fp32.json"))
    assert config is not None and is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("config", ["zero2_bf16.json", "zero3_fp32.json"])
def test_the_export_computes_what_the_engine_computes(one_rank, tmp_path, config):
    """Under ZeRO-3 the model is built and trained partitioned; the export is reloaded whole."""
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps(VOCAB))
    model_args = ModelArguments("tiny", freeze_feature_encoder=True)
    processor = build_processor(model_args, str(vocab_file), 16000)
    ds_config = deepspeed_config(config)
    hf_deepspeed_config = zero3_model_config(ds_config)
    torch.manual_seed(0)
    model = build_model(model_args, VOCAB, 16000)
    frozen_fp32 = frozen_fp32_parameters(model)
    engine, input_dtype = engine_of(model, config)
    expected_weights = fp32_state_dict(engine, frozen_fp32)

    exported = export_and_verify(
        engine,
        processor,
        output_dir=str(tmp_path),
        frozen_fp32=frozen_fp32,
        probe_items=utterances(2),
        vocab=VOCAB,
        input_dtype=input_dtype,
        zero3_config=hf_deepspeed_config,
    )
    assert exported is not None  # rank 0
    target, difference = exported
    assert target == str(tmp_path / "model") and not is_deepspeed_zero3_enabled()
    weights = load_file(f"{target}/model.safetensors")
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected_weights.items())
    # bf16 keeps 8 bits of mantissa: the bf16 engine's logits differ by its rounding alone.
    assert difference <= (0.05 if input_dtype == torch.bfloat16 else 1e-5)
