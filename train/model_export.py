"""Writing a Hugging Face model directory that `transformers.pipeline` transcribes with."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn
from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor
from transformers.integrations import unset_hf_deepspeed_config

from train.ctc_collator import CTCCollator


def frozen_fp32_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Host fp32 copies of the frozen parameters, taken before DeepSpeed casts the module.

    DeepSpeed keeps fp32 master weights only for what it optimizes: a frozen feature encoder
    is cast to bf16/fp16 with the module and would be exported rounded. Frozen weights never
    change, so these copies are what the export writes for them. Parameters that ZeRO-3's
    zero.Init already partitioned while loading are gathered (a collective: every rank calls
    this) at the dtype they were loaded in.
    """
    frozen: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        partitioned = hasattr(param, "ds_id")
        gathered = deepspeed.zero.GatheredParameters([param]) if partitioned else None
        with gathered or contextlib.nullcontext():
            frozen[name] = param.detach().to("cpu", torch.float32, copy=True)
    return frozen


def fp32_state_dict(engine: Any, frozen_fp32: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights at full precision: trained ones from the optimizer's fp32 masters.

    The module's own copy is bf16/fp16 in mixed-precision runs (and partitioned under ZeRO-3);
    the masters are what training actually converged to. Assembling a master is a collective
    under every ZeRO stage, so every rank calls this, in the same parameter order.
    """
    module = engine.module
    state_dict: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        if name in frozen_fp32:
            state_dict[name] = frozen_fp32[name]
            continue
        master = safe_get_full_fp32_param(param)
        if master is None:
            raise RuntimeError(f"DeepSpeed holds no fp32 master for trainable parameter {name}")
        state_dict[name] = master.detach().to("cpu", torch.float32)
    missing = set(module.state_dict()) - set(state_dict)
    if missing:  # wav2vec2 has no buffers; a model that has some needs them exported too
        raise RuntimeError(f"export covers parameters only; missing {sorted(missing)[:3]}")
    return state_dict


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of fp32 weights by name: equal for two copies of the same values, in any order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


def module_digests(engine: Any, cpu_group: Any) -> list[str]:
    """sha256 of every rank's own copy of the module weights, gathered (a collective).

    Under ZeRO-1/2 each rank keeps a whole copy of the module, refreshed from the partitions
    after every step; a rank that drifted would go on training and export nothing wrong that
    anyone could see. Under ZeRO-3 the module is partitioned and the gathered masters are the
    only whole copy, so there is nothing to compare: an empty list.
    """
    if engine.zero_optimization_partition_weights():
        return []
    digest = hashlib.sha256()
    for param in engine.module.parameters():
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest.hexdigest(), group=cpu_group)
    return gathered


def export_model(
    engine: Any, processor: Wav2Vec2Processor, output_dir: str, frozen_fp32: dict[str, torch.Tensor]
) -> str | None:
    """Save OUTPUT/model, a Hugging Face model directory that `transformers.pipeline` loads.

    Config, fp32 safetensors weights (DeepSpeed's master copies, assembled from the ZeRO
    partitions), feature extractor and tokenizer. Rank 0 writes into a temporary directory and
    renames it into place, so a half-written export is never mistaken for a finished one.

    >>> target = export_model(engine, processor, "runs/de", frozen_fp32_parameters(model))
    >>> pipeline("automatic-speech-recognition", model=target)  # on rank 0: "runs/de/model"

    Args:
        engine: the DeepSpeed engine after its last step. A collective: every rank calls this.
        processor: the feature extractor and tokenizer to save beside the weights.
        output_dir: the run's output directory; the model goes to its `model/`.
        frozen_fp32: weights DeepSpeed keeps no fp32 master of, as loaded (frozen_fp32_parameters).

    Returns:
        The model directory on rank 0, None on the other ranks.
    """
    state_dict = fp32_state_dict(engine, frozen_fp32)
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
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
    finally:
        model.config.dtype = dtype
    processor.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    dist.barrier()
    return target


def engine_logits(
    engine: Any, batch: dict[str, torch.Tensor], input_dtype: torch.dtype
) -> torch.Tensor:
    """The engine's eval-mode fp32 logits for a host batch, on the host.

    A collective under ZeRO-3 (the forward gathers partitioned weights): every rank calls this
    with the same batch.
    """
    engine.eval()
    with torch.no_grad():
        values = batch["input_values"].to(engine.device).to(input_dtype)
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(engine.device)
        return engine(values, attention_mask=mask).logits.float().cpu()


def exported_logits_difference(
    model_dir: str, batch: dict[str, torch.Tensor], reference_logits: torch.Tensor
) -> float:
    """Largest |logit| difference between reference logits and the model reloaded, in fp32.

    Call with no ZeRO-3 HfDeepSpeedConfig set: from_pretrained would build the model
    partitioned, a collective the other ranks are not part of.
    """
    inputs = {key: batch[key] for key in ("input_values", "attention_mask") if key in batch}
    exported = Wav2Vec2ForCTC.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = exported(**inputs).logits
    return float((reference_logits - logits).abs().max())


def export_and_verify(
    engine: Any,
    processor: Wav2Vec2Processor,
    *,
    output_dir: str,
    frozen_fp32: dict[str, torch.Tensor],
    probe_items: list[dict[str, Any]],
    vocab: dict[str, int],
    input_dtype: torch.dtype,
    zero3_config: Any | None,
) -> tuple[str, float] | None:
    """export_model, then proof that the export computes what the engine computes.

    The probe is collated as the export's own feature extractor prepares audio (normalized,
    masked if it makes masks); the engine's logits on it (a collective under ZeRO-3) are
    compared on rank 0 with the reloaded export's.

    >>> target, difference = export_and_verify(engine, processor, output_dir="runs/de", ...)

    Args:
        engine, processor, output_dir, frozen_fp32: as for export_model (a collective).
        probe_items: dataset items (ShardDataset) to compare the logits on.
        vocab: the tokenizer's vocabulary, for collating the probe.
        input_dtype: the engine's input dtype (bf16, fp16 or fp32).
        zero3_config: the HfDeepSpeedConfig the engine was built under, None below ZeRO-3; it
            is unset before the reload, which it would otherwise build partitioned.

    Returns:
        On rank 0 the model directory and the largest absolute logit difference; None elsewhere.
    """
    target = export_model(engine, processor, output_dir, frozen_fp32)
    feature_extractor = processor.feature_extractor
    probe = CTCCollator(
        vocab=vocab,
        do_normalize=feature_extractor.do_normalize,
        return_attention_mask=feature_extractor.return_attention_mask,
    )(probe_items)
    reference_logits = engine_logits(engine, probe, input_dtype)
    if zero3_config is not None:  # the engine's last forward is done
        unset_hf_deepspeed_config()
    if target is None:
        return None
    return target, exported_logits_difference(target, probe, reference_logits)
