"""Greedy CTC evaluation split across ranks: WER and CER with jiwer on the gathered transcripts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jiwer
import numpy as np
import torch
import torch.distributed as dist
from transformers import Wav2Vec2CTCTokenizer

from preprocess.shard_format import ShardDataset


def evaluation_batches(
    num_samples: np.ndarray, sampling_rate: int, max_batch_seconds: float, world_size: int
) -> list[list[list[int]]]:
    """Per rank, batches covering every utterance exactly once, the same count on every rank.

    Utterances are sorted by length so batches pad little. Ranks with fewer batches repeat their
    last one (its output is discarded): under ZeRO-3 every forward gathers parameters
    collectively, so a rank that stops early would hang the others.
    """
    order = np.argsort(num_samples, kind="stable")
    budget = max_batch_seconds * sampling_rate
    per_rank: list[list[list[int]]] = []
    for rank in range(world_size):
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order[rank::world_size].tolist():
            if current and (len(current) + 1) * num_samples[index] > budget:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        per_rank.append(batches)
    return per_rank


@torch.no_grad()
def evaluate(
    engine: Any,
    dataset: ShardDataset,
    batches: list[list[int]],
    num_batches: int,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    tokenizer: Wav2Vec2CTCTokenizer,
    input_dtype: torch.dtype,
    use_attention_mask: bool,
) -> dict[str, float]:
    """This rank decodes its batches; rank 0 returns WER and CER over all ranks' utterances."""
    engine.eval()
    references: list[str] = []
    hypotheses: list[str] = []
    model = engine.module
    for position in range(num_batches):
        filler = position >= len(batches)
        indices = batches[-1] if filler else batches[position]
        items = [dataset[i] for i in indices]
        batch = collate(items)
        input_values = batch["input_values"].to(engine.device, input_dtype)
        attention_mask = batch["attention_mask"].to(engine.device)
        logits = engine(
            input_values, attention_mask=attention_mask if use_attention_mask else None
        ).logits
        if filler:
            continue
        frames = model._get_feat_extract_output_lengths(attention_mask.sum(-1)).tolist()
        predicted = logits.argmax(-1).cpu()
        hypotheses += [
            tokenizer.decode(predicted[row, :length].tolist()) for row, length in enumerate(frames)
        ]
        references += [item["text"] for item in items]
    engine.train()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (references, hypotheses))
    all_references = [r for refs, _ in gathered for r in refs]
    all_hypotheses = [h for _, hyps in gathered for h in hyps]
    return {
        "eval_wer": float(jiwer.wer(all_references, all_hypotheses)),
        "eval_cer": float(jiwer.cer(all_references, all_hypotheses)),
        "eval_utterances": len(all_references),
        "eval_example": all_hypotheses[0] if all_hypotheses else "",
    }
