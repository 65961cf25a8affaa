"""Collates raw-audio utterances and transcripts into wav2vec2 CTC batches.

The DataLoader's ``collate_fn`` in train/run_finetuning.py, so with ``--dataloader_num_workers``
above 0 it runs in the loader's worker processes and the training process gets ready tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

WORD_DELIMITER = "|"
UNK_TOKEN = "[UNK]"
LABEL_PAD = -100  # ignored by the CTC loss in transformers' Wav2Vec2ForCTC


def encode_transcript(text: str, vocab: dict[str, int]) -> list[int]:
    """Maps a normalized transcript to CTC label ids, as Wav2Vec2CTCTokenizer does, without
    building a tokenizer: one dict lookup per character.

    >>> encode_transcript("ja gut", {"[UNK]": 1, "|": 2, "a": 3, "j": 4, "g": 5, "u": 6})
    [4, 3, 2, 5, 6, 1]

    Args:
        text: A transcript normalized as the dataset's ``vocab.json`` expects. Spaces become
            the word delimiter ``|``; characters missing from the vocab become ``[UNK]``.
        vocab: Token to id, with ``[UNK]``.

    Raises:
        KeyError: ``vocab`` has no ``[UNK]``.
    """
    unk = vocab[UNK_TOKEN]
    return [vocab.get(char, unk) for char in text.replace(" ", WORD_DELIMITER)]


@dataclass
class CTCCollator:
    """Pads a list of ``{"audio", "text"}`` items into wav2vec2 CTC training tensors, the
    DataLoader's ``collate_fn``, normalizing each utterance as the model's feature extractor does.

    >>> collator = CTCCollator(vocab=train_set.vocab, do_normalize=True)
    >>> batch = collator([train_set[i] for i in ids])
    >>> batch["input_values"].shape, batch["labels"].shape   # (batch, samples), (batch, tokens)

    Calling it returns ``input_values`` (float32, zero-padded), ``input_lengths`` (samples),
    ``labels`` (int64, padded with -100, which the CTC loss ignores), ``target_lengths`` and,
    with ``return_attention_mask``, ``attention_mask``. The lengths stay host tensors: the CTC
    loss wants its lengths on the host, so they never travel to the device and back.

    Args:
        vocab: Token to id, with the word delimiter ``|`` and ``[UNK]`` (the dataset's
            ``vocab.json``).
        do_normalize: Scale each utterance to zero mean and unit variance over its real
            samples only, as Wav2Vec2FeatureExtractor does given an attention mask, so padding
            never shifts the statistics. Items from a ShardDataset bring the ``audio_mean``
            and ``audio_std`` computed at preprocessing; others get them computed here.
        return_attention_mask: Also return the (batch, samples) mask of real samples. Off by
            default: it costs the host as much as the audio itself, and the training loop
            builds it on the device from ``input_lengths`` instead (``attention_mask``).
        pad_to_multiple_of: Round the padded length up to a multiple of this many samples.

    Raises:
        ValueError: ``vocab`` lacks ``|`` or ``[UNK]``, or ``pad_to_multiple_of`` < 1; when
            called, an item's audio is not 1-D.
    """

    vocab: dict[str, int]
    do_normalize: bool
    return_attention_mask: bool = False
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        for token in (WORD_DELIMITER, UNK_TOKEN):
            if token not in self.vocab:
                raise ValueError(f"vocab has no {token!r} token")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be >= 1")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        audios = [item["audio"] for item in items]
        if any(audio.ndim != 1 for audio in audios):
            raise ValueError("audio must be 1-D")
        frames = max(audio.shape[0] for audio in audios)
        if self.pad_to_multiple_of is not None:
            frames = -(-frames // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_values = torch.empty(len(items), frames, dtype=torch.float32)
        # A numpy view of the tensor lets numpy write each utterance straight into place.
        values = input_values.numpy()
        for row, (item, audio) in enumerate(zip(items, audios, strict=True)):
            target = values[row, : audio.shape[0]]
            if self.do_normalize:
                mean, std = item.get("audio_mean"), item.get("audio_std")
                if mean is None or std is None:
                    # Statistics in float64 so long utterances lose no precision.
                    mean, std = audio.mean(dtype=np.float64), audio.std(dtype=np.float64)
                scale = 1.0 / math.sqrt(float(std) ** 2 + 1e-7)
                # One pass over the samples, then a pass over data still in cache.
                np.multiply(audio, scale, out=target)
                target -= float(mean) * scale
            else:
                target[:] = audio
            values[row, audio.shape[0] :] = 0.0

        label_ids = [encode_transcript(item["text"], self.vocab) for item in items]
        lengths = np.fromiter(map(len, label_ids), dtype=np.int64, count=len(items))
        labels = np.full((len(items), int(lengths.max())), LABEL_PAD, dtype=np.int64)
        # Row-major order of the mask is the order of the concatenated ids.
        labels[np.arange(labels.shape[1]) < lengths[:, None]] = np.fromiter(
            itertools.chain.from_iterable(label_ids), dtype=np.int64, count=int(lengths.sum())
        )
        target_lengths = torch.from_numpy(lengths)

        input_lengths = torch.tensor([audio.shape[0] for audio in audios], dtype=torch.int64)
        batch = {
            "input_values": input_values,
            "input_lengths": input_lengths,
            "labels": torch.from_numpy(labels),
            "target_lengths": target_lengths,
        }
        if self.return_attention_mask:
            batch["attention_mask"] = attention_mask(input_lengths, frames, torch.device("cpu"))
        return batch


def attention_mask(input_lengths: torch.Tensor, frames: int, device: torch.device) -> torch.Tensor:
    """The (batch, frames) int32 mask of real samples, built on ``device`` from the lengths, so
    the host never builds or copies a mask as large as the audio.

    >>> mask = attention_mask(batch["input_lengths"], batch["input_values"].shape[1], device)

    Args:
        input_lengths: Real samples per utterance (host or device).
        frames: The padded length, ``input_values.shape[1]``.
        device: Where to build the mask.
    """
    lengths = input_lengths.to(device, non_blocking=True)
    return (torch.arange(frames, device=device) < lengths[:, None]).to(torch.int32)
