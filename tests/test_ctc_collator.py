"""Tests for the wav2vec2 CTC collator."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

from train.ctc_collator import CTCCollator, attention_mask, encode_transcript

VOCAB = {
    "[PAD]": 0,
    "[UNK]": 1,
    "|": 2,
    **{char: i + 3 for i, char in enumerate(string.ascii_lowercase + "'")},
}
TEXTS = ["hello world", "it's a test", "naïve café"]


def make_items(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "audio": (rng.normal(0.3 * i, 0.1 + i, length)).astype(np.float32),
            "text": TEXTS[i % len(TEXTS)],
        }
        for i, length in enumerate(lengths)
    ]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Wav2Vec2CTCTokenizer:
    vocab_file = tmp_path / "vocab.json"
    vocab_file.write_text(json.dumps(VOCAB))
    return Wav2Vec2CTCTokenizer(
        str(vocab_file), unk_token="[UNK]", pad_token="[PAD]", word_delimiter_token="|"
    )


def test_padding_mask_and_labels(tokenizer: Wav2Vec2CTCTokenizer) -> None:
    items = make_items([700, 1_000, 300])
    batch = CTCCollator(vocab=VOCAB, do_normalize=False, return_attention_mask=True)(items)

    assert batch["input_values"].dtype == torch.float32
    assert batch["input_values"].shape == (3, 1_000)
    assert batch["attention_mask"].dtype == torch.int32
    assert batch["input_lengths"].tolist() == [700, 1_000, 300]
    for row, item in enumerate(items):
        length = len(item["audio"])
        assert torch.equal(batch["input_values"][row, :length], torch.from_numpy(item["audio"]))
        assert torch.all(batch["input_values"][row, length:] == 0)
        assert torch.all(batch["attention_mask"][row, :length] == 1)
        assert torch.all(batch["attention_mask"][row, length:] == 0)

    # Label ids as transformers' tokenizer makes them, padded with -100 as its data collators do.
    ids = [tokenizer(item["text"]).input_ids for item in items]
    assert batch["target_lengths"].tolist() == [len(i) for i in ids]
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].shape == (3, max(len(i) for i in ids))
    for row, label_ids in enumerate(ids):
        assert batch["labels"][row, : len(label_ids)].tolist() == label_ids
        assert torch.all(batch["labels"][row, len(label_ids) :] == -100)


def test_pad_to_multiple_and_no_mask() -> None:
    items = make_items([1_001, 17])
    batch = CTCCollator(
        vocab=VOCAB, do_normalize=True, return_attention_mask=False, pad_to_multiple_of=320
    )(items)
    assert batch["input_values"].shape == (2, 1_280)
    assert "attention_mask" not in batch
    # Still standardised over the real samples only: the feature extractor does that when it
    # computes a mask, whether or not the model is given one.
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(
        [item["audio"] for item in items],
        sampling_rate=16_000,
        padding=True,
        pad_to_multiple_of=320,
        return_tensors="np",
    )
    np.testing.assert_allclose(
        batch["input_values"].numpy(), expected["input_values"], rtol=0, atol=1e-5
    )
    assert batch["input_lengths"].tolist() == expected["attention_mask"].sum(axis=1).tolist()


def test_normalization_matches_feature_extractor() -> None:
    items = make_items([80_000, 16_000, 4_321, 50])
    batch = CTCCollator(vocab=VOCAB, do_normalize=True, return_attention_mask=True)(items)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    expected = extractor(
        [item["audio"] for item in items],
        sampling_rate=16_000,
        padding=True,
        return_tensors="np",
    )
    np.testing.assert_allclose(
        batch["input_values"].numpy(), expected["input_values"], rtol=0, atol=1e-5
    )
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), expected["attention_mask"])
    # The statistics ignore padding: each row is standardised over its real samples.
    for row, item in enumerate(items):
        real = batch["input_values"][row, : len(item["audio"])].double()
        assert abs(real.mean().item()) < 1e-4
        assert abs(real.std(correction=0).item() - 1) < 1e-4


def test_labels_match_and_roundtrip_through_hf_tokenizer(
    tokenizer: Wav2Vec2CTCTokenizer,
) -> None:
    items = make_items([100, 100, 100])
    batch = CTCCollator(vocab=VOCAB, do_normalize=False, return_attention_mask=True)(items)
    for row, item in enumerate(items):
        length = int(batch["target_lengths"][row])
        label_ids = batch["labels"][row, :length].tolist()
        assert label_ids == tokenizer(item["text"]).input_ids
        decoded = tokenizer.decode(label_ids, group_tokens=False)
        # Characters outside the vocab come back as the unknown token.
        expected = item["text"].replace("ï", "[UNK]").replace("é", "[UNK]")
        assert decoded == expected


def test_unknown_characters_and_delimiter() -> None:
    assert encode_transcript("ab é", VOCAB) == [
        VOCAB["a"],
        VOCAB["b"],
        VOCAB["|"],
        VOCAB["[UNK]"],
    ]


def test_vocab_without_delimiter_is_rejected() -> None:
    vocab = {k: v for k, v in VOCAB.items() if k != "|"}
    with pytest.raises(ValueError, match="'\\|'"):
        CTCCollator(vocab=vocab, do_normalize=False)


def test_precomputed_statistics_are_used_and_match() -> None:
    items = make_items([80_000, 16_000, 4_321])
    computed = CTCCollator(vocab=VOCAB, do_normalize=True)(items)
    with_stats = [
        {**item, "audio_mean": item["audio"].mean(dtype=np.float64),
         "audio_std": item["audio"].std(dtype=np.float64)}
        for item in items
    ]  # fmt: skip
    np.testing.assert_allclose(
        CTCCollator(vocab=VOCAB, do_normalize=True)(with_stats)["input_values"].numpy(),
        computed["input_values"].numpy(),
        rtol=0,
        atol=1e-6,
    )
    # The statistics really come from the item: shifted ones shift the output.
    shifted = [{**item, "audio_mean": item["audio_mean"] + 1.0} for item in with_stats]
    assert not torch.allclose(
        CTCCollator(vocab=VOCAB, do_normalize=True)(shifted)["input_values"][0, :100],
        computed["input_values"][0, :100],
    )


def test_device_attention_mask_equals_collated_one() -> None:
    items = make_items([700, 1_000, 300])
    batch = CTCCollator(vocab=VOCAB, do_normalize=False, return_attention_mask=True)(items)
    built = attention_mask(batch["input_lengths"], 1_000, torch.device("cpu"))
    assert built.dtype == torch.int32
    assert torch.equal(built, batch["attention_mask"])
    assert batch["attention_mask"].sum().item() == 2_000
