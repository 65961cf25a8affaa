"""Transcript normalization for CTC targets, and the character vocabulary built from it.

Punctuation and symbols are dropped by Unicode category (P* and S*), in every script, so a
multilingual manifest never puts "¿", "。", "«" or "€" into the vocabulary. Letters keep their
diacritics (NFC: "é" is one character; umlauts and ß are letters of their own, not accents to
strip), combining marks such as Devanagari and Arabic vowel signs stay, and so do digits.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WORD_DELIMITER = "|"
UNK_TOKEN = "[UNK]"
PAD_TOKEN = "[PAD]"

# Recorded in dataset.json and compared on reruns: bump it whenever TextNormalizer maps some
# sentence differently, so one dataset never mixes transcripts of two versions. Datasets that
# record none were made by version 1: a fixed list of characters (chars_to_drop) and nothing else.
TEXT_NORMALIZATION_VERSION = 2

APOSTROPHE = "'"
# The typographic apostrophe (right single quotation mark) and the modifier letter apostrophe.
APOSTROPHE_VARIANTS = ("\u2019", "\u02bc")
# Zero-width non-joiner and joiner: format characters, but part of the spelling in Persian and
# Indic scripts, so they are kept while other invisible format characters are removed.
JOINERS = frozenset("\u200c\u200d")


class _CategoryTable(dict[int, str | None]):
    """`str.translate` table filled per code point on first sight, so each character's Unicode
    category is looked up once per process: punctuation and symbols become a space; invisible
    control and format characters (bidi marks, soft hyphen, byte order mark) are removed, since
    they are not spoken and may sit inside a word; everything else maps to itself.
    """

    def __init__(self, keep: str) -> None:
        super().__init__()
        self.keep = keep

    def __missing__(self, codepoint: int) -> str | None:
        char = chr(codepoint)
        category = unicodedata.category(char)
        value: str | None
        if char in self.keep or char.isspace() or char in JOINERS:
            value = char
        elif category[0] in "PS":
            value = " "
        elif category in ("Cc", "Cf"):
            value = None
        else:
            value = char
        self[codepoint] = value
        return value


# Module level rather than per normalizer: the instances stay plain values, which datasets'
# map fingerprinting (benchmarks/hf_trainer_baseline.py) hashes the same in every process.
_TABLES = {False: _CategoryTable(keep=""), True: _CategoryTable(keep=APOSTROPHE)}


def _is_letter(char: str) -> bool:
    """A letter or a combining mark on one (a vowel sign ends many Devanagari words)."""
    return unicodedata.category(char)[0] in "LM"


def _keep_in_word(match: re.Match[str]) -> str:
    """An apostrophe between two letters stays ("don't", "l'homme"); a quote becomes a space."""
    text, index = match.string, match.start()
    if 0 < index < len(text) - 1 and _is_letter(text[index - 1]) and _is_letter(text[index + 1]):
        return APOSTROPHE
    return " "


@dataclass(frozen=True)
class TextNormalizer:
    """Turns a raw sentence into the transcript the model is trained to emit.

    `keep_apostrophes` keeps an apostrophe between two letters ("dell'anno"), after mapping
    ’ and ʼ to "'"; quotes at either end of a word go with the other punctuation.
    `chars_to_drop` is a regular expression whose matches become spaces as well, for characters
    a corpus needs gone that are not punctuation or symbols.
    """

    lowercase: bool = True
    keep_apostrophes: bool = False
    chars_to_drop: str = ""

    def __call__(self, sentence: str) -> str:
        # NFC first: Common Voice mixes precomposed "ä" with "a" + combining diaeresis.
        text = unicodedata.normalize("NFC", sentence)
        if self.lowercase:
            text = text.lower()
        # str.replace, not a translate table: translate looks up every character in Python
        # objects, which made this step a third of reading a large manifest.
        for variant in APOSTROPHE_VARIANTS:
            text = text.replace(variant, APOSTROPHE)
        if self.chars_to_drop:
            text = re.sub(self.chars_to_drop, " ", text)
        text = text.translate(_TABLES[self.keep_apostrophes])
        if self.keep_apostrophes:
            text = re.sub(APOSTROPHE, _keep_in_word, text)
        return " ".join(text.split())

    def options(self) -> dict[str, Any]:
        """What dataset.json records of this normalization; reruns must match it."""
        return {
            "text_normalization_version": TEXT_NORMALIZATION_VERSION,
            "lowercase": self.lowercase,
            "keep_apostrophes": self.keep_apostrophes,
            "chars_to_drop": self.chars_to_drop,
        }


def recorded_normalization(options: Mapping[str, Any]) -> dict[str, Any]:
    """The normalization options of a dataset.json, in the form `TextNormalizer.options` has.

    Datasets made before an option existed were made without it: version 1, and apostrophes
    dropped with the rest of chars_to_drop.
    """
    return {
        "text_normalization_version": options.get("text_normalization_version", 1),
        "lowercase": options["lowercase"],
        "keep_apostrophes": options.get("keep_apostrophes", False),
        "chars_to_drop": options["chars_to_drop"],
    }


def build_vocab(transcripts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary in the format `Wav2Vec2CTCTokenizer` loads.

    The space becomes the word delimiter "|"; [UNK] and [PAD] come last, and [PAD] doubles as
    the CTC blank, as in the transformers CTC examples. A "|" among the transcripts is that
    delimiter (a rerun passes the previous vocabulary's symbols in), not a second symbol.
    """
    characters = set()
    for transcript in transcripts:
        characters.update(transcript)
    characters -= {" ", WORD_DELIMITER}
    symbols = [WORD_DELIMITER, *sorted(characters)]
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab[UNK_TOKEN] = len(vocab)
    vocab[PAD_TOKEN] = len(vocab)
    return vocab
