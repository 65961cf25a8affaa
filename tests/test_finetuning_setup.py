"""run_finetuning's own helpers, without the launcher: the DeepSpeed config of a run, the sampler
of its batches, and a batch on the device."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from argument_classes import FinetuningArguments
from train.duration_bucket_sampler import DurationBucketSampler
from train.elastic_checkpoint import BatchLayout
from train.run_finetuning import TrainingSetupError, deepspeed_config, model_inputs, train_sampler


@pytest.mark.parametrize("load_universal", [False, True])
def test_the_config_holds_the_run_and_loads_universal_checkpoints_when_asked(load_universal):
    arguments = FinetuningArguments("out", deepspeed="zero2_fp32.json", learning_rate=3e-4)
    config = deepspeed_config(arguments, 10, accumulation=4, load_universal=load_universal)
    assert (config["gradient_accumulation_steps"], config["train_micro_batch_size_per_gpu"]) == (
        4,
        1,
    )
    assert config["optimizer"]["params"]["lr"] == config["scheduler"]["params"]["warmup_max_lr"]
    assert config["scheduler"]["params"]["total_num_steps"] == 10
    assert ("checkpoint" in config) == load_universal
    if load_universal:
        assert config["checkpoint"] == {"load_universal": True}


def test_the_sampler_splits_steps_as_the_layout_says_and_refuses_a_too_small_set():
    lengths = np.random.default_rng(0).integers(8_000, 24_000, size=40)
    train_set = SimpleNamespace(audio_lengths=lengths, sampling_rate=16_000)
    layout = BatchLayout(world_size=2, gradient_accumulation_steps=3, max_batch_seconds=4.0)
    sampler = train_sampler(train_set, layout, rank=1, num_buckets=5, seed=7)
    expected = DurationBucketSampler(
        audio_lengths=lengths, sampling_rate=16_000, max_batch_seconds=4.0, world_size=2, rank=1,
        gradient_accumulation_steps=3, num_buckets=5, seed=7,
    )  # fmt: skip
    assert list(sampler) == list(expected) and len(sampler) % 3 == 0
    few = SimpleNamespace(audio_lengths=lengths[:2], sampling_rate=16_000)
    with pytest.raises(TrainingSetupError, match=r"fewer than world_size \* gradient_accumulation"):
        train_sampler(few, layout, rank=0, num_buckets=5, seed=7)


@pytest.mark.parametrize("with_mask", [True, False])
def test_a_batch_goes_to_the_device_in_the_engine_dtype(with_mask):
    batch = {"input_values": torch.randn(2, 5), "input_lengths": torch.tensor([5, 3])}
    values, mask = model_inputs(batch, torch.device("cpu"), torch.bfloat16, with_mask)
    assert values.dtype == torch.bfloat16
    assert torch.equal(values, batch["input_values"].to(torch.bfloat16))
    if with_mask:
        assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    else:
        assert mask is None
