"""Transcripts in six languages keep their letters and lose their punctuation, then build a vocab.

Expected transcripts are written out by hand; the vocabulary is checked by Unicode category, so
no punctuation or symbol of any script may reach it.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from argument_classes import ArgumentError, ManifestArguments, PreprocessArguments
from preprocess.manifest import read_manifest
from preprocess.prepare_dataset import main, prepare
from preprocess.text_normalization import (
    PAD_TOKEN,
    TEXT_NORMALIZATION_VERSION,
    UNK_TOKEN,
    WORD_DELIMITER,
    TextNormalizer,
    build_vocab,
)

# (sentence as written, transcript by default, letters of the language that must stay)
SENTENCES = {
    "German": (
        "„Grüß Gott“, sagte er – ‚ja‘! Die Straße ist naß; Öl & Äpfel… (10 % billiger)",
        "grüß gott sagte er ja die straße ist naß öl äpfel 10 billiger",
        "äöüß",
    ),
    "Spanish": (
        "¿Dónde está el niño? ¡Mañana, señor! —dijo—",
        "dónde está el niño mañana señor dijo",
        "óáñ",
    ),
    "French": (
        "« Ça va ? » — L’homme a dit : « très bien » ; c’est l’été…",
        "ça va l homme a dit très bien c est l été",
        "çèé",
    ),
    "Portuguese": (
        "“Não!”, disse João — ação, coração e pães… As mães põem 3 ovos.",
        "não disse joão ação coração e pães as mães põem 3 ovos",
        "ãçõ",
    ),
    "Chinese": (
        "你好，世界！「我们」去了『北京』：今天；明天？卡尔·马克思、恩格斯。",
        "你好 世界 我们 去了 北京 今天 明天 卡尔 马克思 恩格斯",
        "你好世界我们去了北京今天明天",
    ),
    "Arabic": (
        "مرحبا، كيف حالك؟ أنا بخير؛ شكرا.",
        "مرحبا كيف حالك أنا بخير شكرا",
        "مرحباكيفلأنشخ",
    ),
}
# Each in the manifest of real recordings that reached the vocabulary, or a neighbour of one.
PUNCTUATION = "„“‚‘«»¿¡。，、！？：；「」『』،؛؟—–…·\"'()[]{}<>*#@%&/\\|_~^`´$€£+=§°©®™→•"
SPECIAL_TOKENS = {WORD_DELIMITER, UNK_TOKEN, PAD_TOKEN}


def punctuation_or_symbols(vocab: dict[str, int]) -> list[str]:
    """Vocabulary entries of Unicode category P* or S*, the special tokens aside."""
    return [
        symbol
        for symbol in vocab
        if symbol not in SPECIAL_TOKENS and unicodedata.category(symbol)[0] in "PS"
    ]


@pytest.mark.parametrize("language", SENTENCES)
def test_sentences_lose_punctuation_and_keep_letters(language: str) -> None:
    sentence, expected, letters = SENTENCES[language]
    transcript = TextNormalizer()(sentence)
    assert transcript == expected
    vocab = build_vocab([transcript])
    assert punctuation_or_symbols(vocab) == []
    assert set(letters) <= set(vocab)


def test_vocabulary_of_all_languages_has_no_punctuation_or_symbols() -> None:
    sentences = [sentence for sentence, _, _ in SENTENCES.values()]
    assert punctuation_or_symbols(build_vocab(sentences))  # the raw sentences would bring some
    vocab = build_vocab(TextNormalizer()(sentence) for sentence in sentences)
    assert punctuation_or_symbols(vocab) == []
    assert set("".join(letters for _, _, letters in SENTENCES.values())) <= set(vocab)
    assert "3" in vocab and "1" in vocab  # digits stay
    # Ids 0..n-1 with the delimiter first and the special tokens last.
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab[WORD_DELIMITER] == 0 and vocab[PAD_TOKEN] == len(vocab) - 1


@pytest.mark.parametrize("mark", list(PUNCTUATION))
def test_every_punctuation_mark_and_symbol_becomes_a_space(mark: str) -> None:
    assert TextNormalizer()(f"wort{mark}wort {mark}ende{mark}") == "wort wort ende"


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("Gru\u0308ße, cafe\u0301!", "grüße café"),  # decomposed input becomes one character each
        ("STRASSE, Straße, GROẞ", "strasse straße groß"),  # ß stays ß; capital ẞ lowercases to it
        ("नमस्ते, दुनिया!", "नमस्ते दुनिया"),  # Devanagari vowel signs and virama (Mn, Mc)
        ("مُحَمَّد، عَلِيّ؟", "مُحَمَّد عَلِيّ"),  # Arabic harakat and shadda (Mn)
        ("Um 9:30 Uhr, ٣ أيام", "um 9 30 uhr ٣ أيام"),  # digits of any script stay
        ("Sil\u00adben\u200f, \ufeffDank", "silben dank"),  # soft hyphen, bidi mark, BOM: unspoken
        ("می\u200cخواهم", "می\u200cخواهم"),  # the zero-width non-joiner is Persian spelling
        ("a\u00a0b\u3000c\td", "a b c d"),  # every kind of space collapses to one
    ],
)
def test_letters_marks_and_digits_stay(sentence: str, expected: str) -> None:
    assert TextNormalizer()(sentence) == expected


def test_combining_marks_stay_attached_to_their_letters() -> None:
    transcript = TextNormalizer()("नमस्ते, दुनिया!")
    categories = {unicodedata.category(char) for char in transcript}
    assert {"Mn", "Mc"} <= categories
    # No mark starts a word: dropping the comma did not separate a mark from its letter.
    assert all(unicodedata.category(word[0])[0] == "L" for word in transcript.split())


def test_lowercase_can_be_turned_off() -> None:
    assert TextNormalizer(lowercase=False)("¿Dónde, Straße?") == "Dónde Straße"


@pytest.mark.parametrize(
    ("sentence", "without", "with_apostrophes"),
    [
        ("Don’t say 'hello'!", "don t say hello", "don't say hello"),
        ("L’homme, l'été", "l homme l été", "l'homme l'été"),
        ("dell\u02bcanno e dell'arte", "dell anno e dell arte", "dell'anno e dell'arte"),
        ("rock'n'roll", "rock n roll", "rock'n'roll"),
        ("'zitiert' ’so’ in the 90's, l'", "zitiert so in the 90 s l", "zitiert so in the 90 s l"),
    ],
)
def test_apostrophes_inside_words_are_an_option(
    sentence: str, without: str, with_apostrophes: str
) -> None:
    assert TextNormalizer()(sentence) == without
    assert TextNormalizer(keep_apostrophes=True)(sentence) == with_apostrophes


def test_apostrophe_reaches_the_vocabulary_only_when_kept() -> None:
    sentences = ["L’homme qu'on voit", "'Quoted' words"]
    assert "'" not in build_vocab(TextNormalizer()(s) for s in sentences)
    kept = build_vocab(TextNormalizer(keep_apostrophes=True)(s) for s in sentences)
    assert punctuation_or_symbols(kept) == ["'"]


def test_chars_to_drop_removes_more_on_top() -> None:
    normalizer = TextNormalizer(chars_to_drop="[0-9ʻ]")
    assert normalizer("Um 9 Uhr, Hawaiʻi!") == "um uhr hawai i"
    assert TextNormalizer()("Um 9 Uhr, Hawaiʻi!") == "um 9 uhr hawaiʻi"  # ʻ is a letter (Lm)


def test_previous_vocabulary_passed_back_in_keeps_ids_contiguous() -> None:
    """A rerun builds the vocabulary from the new transcripts plus the previous symbols."""
    first = build_vocab(["ab c"])
    previous_symbols = "".join(symbol for symbol in first if len(symbol) == 1)
    second = build_vocab(["abd", previous_symbols])
    assert list(second) == ["|", "a", "b", "c", "d", UNK_TOKEN, PAD_TOKEN]
    assert list(second.values()) == list(range(7))


def test_common_voice_tsv_and_jsonl_manifests_are_normalized(tmp_path: Path) -> None:
    """The real manifest path: bare quotes in an unquoted TSV, and a JSONL manifest."""
    languages = list(SENTENCES)
    lines = ["client_id\tpath\tsentence"]
    lines += [f"c{i}\t{i}.mp3\t{SENTENCES[language][0]}" for i, language in enumerate(languages)]
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(tmp_path / "m.jsonl", "w", encoding="utf-8") as jsonl:
        for i, language in enumerate(languages):
            row = {"audio_filepath": f"{i}.wav", "text": SENTENCES[language][0]}
            jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")

    expected = [SENTENCES[language][1] for language in languages]
    tsv = read_manifest(str(tmp_path / "train.tsv"), TextNormalizer())
    jsonl_rows = read_manifest(
        str(tmp_path / "m.jsonl"),
        TextNormalizer(),
        audio_column="audio_filepath",
        text_column="text",
    )
    for rows in (tsv, jsonl_rows):
        assert rows.column("sentence").to_pylist() == [SENTENCES[x][0] for x in languages]
        assert rows.column("text").to_pylist() == expected
        assert punctuation_or_symbols(build_vocab(rows.column("text").to_pylist())) == []


def write_punctuation_only_manifest(directory: Path) -> Path:
    """One row whose transcript normalizes to nothing: a reject before any audio is decoded,
    so prepare() commits a dataset without starting Ray."""
    manifest = directory / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "¿…!» ’"}) + "\n")
    return manifest


def test_dataset_records_normalization_and_refuses_a_rerun_made_differently(
    tmp_path: Path,
) -> None:
    manifest = write_punctuation_only_manifest(tmp_path)
    output = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--audio_column", "audio", "--text_column", "text"]
    argv += ["--output_dir", str(output)]
    assert main([*argv, "--keep_apostrophes"]) == 0
    metadata = json.loads((output / "dataset.json").read_text())
    assert metadata["counts"]["rejected_by_reason"] == {"empty_transcript": 1}
    assert metadata["options"]["keep_apostrophes"] is True
    assert metadata["options"]["chars_to_drop"] == ""
    assert metadata["options"]["text_normalization_version"] == TEXT_NORMALIZATION_VERSION

    manifest_args = ManifestArguments(str(manifest), audio_column="audio", text_column="text")

    def rerun(**options: Any) -> dict[str, Any]:
        return prepare(manifest_args, PreprocessArguments(output_dir=str(output), **options))

    assert rerun(keep_apostrophes=True)["message"].startswith("nothing to do")
    with pytest.raises(ArgumentError, match=r"keep_apostrophes is False .* built with True"):
        rerun()
    with pytest.raises(ArgumentError, match=r"chars_to_drop is '\[0-9\]' .* built with ''"):
        rerun(keep_apostrophes=True, chars_to_drop="[0-9]")
    with pytest.raises(ArgumentError, match="lowercase is False"):
        rerun(keep_apostrophes=True, lowercase=False)


def test_dataset_from_before_unicode_categories_refuses_a_rerun(tmp_path: Path) -> None:
    """Its options have no version and no keep_apostrophes: new rows would be normalized
    differently from its rows, whatever chars_to_drop says."""
    manifest = write_punctuation_only_manifest(tmp_path)
    output = tmp_path / "out"
    manifest_args = ManifestArguments(str(manifest), audio_column="audio", text_column="text")
    prepare(manifest_args, PreprocessArguments(output_dir=str(output)))
    dataset_json = output / "dataset.json"
    metadata = json.loads(dataset_json.read_text())
    old_list = r"""[\,\?\.\!\-\;\:\"\“\”\„\‟\«\»\‹\›\%\‘\’\‚\'\`\´\…\–\—]"""
    del metadata["options"]["text_normalization_version"], metadata["options"]["keep_apostrophes"]
    metadata["options"]["chars_to_drop"] = old_list
    dataset_json.write_text(json.dumps(metadata))

    refusal = rf"text_normalization_version is {TEXT_NORMALIZATION_VERSION} .* built with 1"
    with pytest.raises(ArgumentError, match=refusal):
        prepare(manifest_args, PreprocessArguments(output_dir=str(output), chars_to_drop=old_list))
