"""Transcript normalization for CTC targets, and the character vocabulary built from it.

Defaults fit German Common Voice: lowercase, punctuation and quotes dropped, umlauts and ß kept
(they are letters of their own in German, not accents to strip).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

WORD_DELIMITER = "|"
UNK_TOKEN = "[UNK]"
PAD_TOKEN = "[PAD]"

DEFAULT_CHARS_TO_DROP = (
    r"""[\,\?\.\!\-\;\:\"\“\”\„\‟\«\»\‹\›\%\‘\’\‚\'\`\´\…\–\—"""
    r"""\(\)\[\]\{\}\/\*\+\=\&\#\@\_\~\^\<\>]"""
)


@dataclass(frozen=True)
class TextNormalizer:
    """Turns a raw sentence into the transcript the model is trained to emit."""

    lowercase: bool = True
    chars_to_drop: str = DEFAULT_CHARS_TO_DROP

    @cached_property
    def _drop_pattern(self) -> re.Pattern[str]:
        return re.compile(self.chars_to_drop)

    def __call__(self, sentence: str) -> str:
        # NFC first: Common Voice mixes precomposed "ä" with "a" + combining diaeresis.
        text = unicodedata.normalize("NFC", sentence)
        if self.lowercase:
            text = text.lower()
        text = self._drop_pattern.sub(" ", text) if self.chars_to_drop else text
        return " ".join(text.split())


def build_vocab(transcripts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary in the format `Wav2Vec2CTCTokenizer` loads.

    The space becomes the word delimiter "|"; [UNK] and [PAD] come last, and [PAD] doubles as
    the CTC blank, as in the transformers CTC examples.
    """
    characters = set()
    for transcript in transcripts:
        characters.update(transcript)
    characters.discard(" ")
    symbols = [WORD_DELIMITER, *sorted(characters)]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab[UNK_TOKEN] = len(vocab)
    vocab[PAD_TOKEN] = len(vocab)
    return vocab


def vocab_json(vocab: dict[str, int]) -> str:
    return json.dumps(vocab, ensure_ascii=False, indent=1)
