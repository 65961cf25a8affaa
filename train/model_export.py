"""Writing a Hugging Face model directory that `transformers.pipeline` transcribes with."""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from transformers import Wav2Vec2Processor


def export_model(engine: Any, processor: Wav2Vec2Processor, output_dir: str) -> str | None:
    """Save OUTPUT/model: config, safetensors weights in float32, feature extractor, tokenizer.

    Under ZeRO-3 the weights are partitioned across ranks and gathered here, which is a
    collective: every rank must call this. Rank 0 writes into a temporary directory and renames
    it into place, so a half-written export is never mistaken for a finished one.
    """
    if engine.zero_optimization_partition_weights():
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict()
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    target = os.path.join(output_dir, "model")
    staging = f"{target}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model = engine.module
    dtype = model.config.dtype
    model.config.dtype = torch.float32
    try:
        model.save_pretrained(
            staging,
            state_dict={name: tensor.float().cpu() for name, tensor in state_dict.items()},
            safe_serialization=True,
        )
    finally:
        model.config.dtype = dtype
    processor.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    dist.barrier()
    return target
