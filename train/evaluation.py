"""Greedy CTC evaluation split across ranks: WER and CER with jiwer on the gathered transcripts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jiwer
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Wav2Vec2CTCTokenizer

from preprocess.shard_format import ShardDataset
from train.ctc_collator import attention_mask


def evaluation_batches(
    audio_lengths: np.ndarray, sampling_rate: int, max_batch_seconds: float, world_size: int
) -> list[list[list[int]]]:
    """Per rank, batches covering every utterance exactly once.

    Utterances are sorted by length so batches pad little, and dealt to ranks in turn; with
    fewer utterances than ranks some ranks get no batch at all.
    """
    order = np.argsort(audio_lengths, kind="stable")
    budget = max_batch_seconds * sampling_rate
    per_rank: list[list[list[int]]] = []
    for rank in range(world_size):
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order[rank::world_size].tolist():
            if current and (len(current) + 1) * audio_lengths[index] > budget:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        per_rank.append(batches)
    return per_rank


class _WithTranscripts:
    """Collates a batch and keeps its reference transcripts beside it."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collate = collate

    def __call__(self, items: Sequence[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
        return [item["text"] for item in items], self.collate(list(items))


@torch.no_grad()
def evaluate(
    engine: Any,
    *,
    dataset: ShardDataset,
    batches: list[list[int]],
    num_batches: int,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    tokenizer: Wav2Vec2CTCTokenizer,
    input_dtype: torch.dtype,
    use_attention_mask: bool,
    cpu_group: Any,
    num_workers: int,
) -> dict[str, float]:
    """This rank decodes its batches; every rank returns WER and CER over all ranks' utterances.

    Every rank runs `num_batches` forwards: under ZeRO-3 a forward gathers parameters
    collectively, so a rank with fewer (or no) batches of its own repeats one whose output it
    discards. Collation runs in DataLoader workers; the greedy predictions stay on the device
    until the last forward, then come to the host in one copy and are decoded there. The
    transcripts are gathered once, on the CPU group.
    """
    engine.eval()
    filler = batches[-1] if batches else [0]
    plan = batches + [filler] * (num_batches - len(batches))
    loader = DataLoader(
        dataset,
        batch_sampler=plan,
        collate_fn=_WithTranscripts(collate),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    model = engine.module
    predictions: list[torch.Tensor] = []
    frames: list[int] = []
    references: list[str] = []
    for position, (texts, batch) in enumerate(loader):
        input_values = batch["input_values"].to(engine.device, non_blocking=True)
        mask = (
            attention_mask(batch["input_lengths"], input_values.shape[1], engine.device)
            if use_attention_mask
            else None
        )
        logits = engine(input_values.to(input_dtype), attention_mask=mask).logits
        if position >= len(batches):
            continue
        predictions += list(logits.argmax(-1).to(torch.int32))
        frames += model._get_feat_extract_output_lengths(batch["input_lengths"]).tolist()
        references += texts
    engine.train()

    hypotheses: list[str] = []
    if predictions:
        # One device-to-host copy for the whole evaluation, not one per batch.
        flat = torch.cat([row[:length] for row, length in zip(predictions, frames, strict=True)])
        rows = flat.cpu().split(frames)
        hypotheses = [tokenizer.decode(row.tolist()) for row in rows]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (references, hypotheses), group=cpu_group)
    all_references = [r for refs, _ in gathered for r in refs]
    all_hypotheses = [h for _, hyps in gathered for h in hyps]
    return {
        "eval_wer": float(jiwer.wer(all_references, all_hypotheses)),
        "eval_cer": float(jiwer.cer(all_references, all_hypotheses)),
        "eval_utterances": len(all_references),
        "eval_example": all_hypotheses[0] if all_hypotheses else "",
    }
