"""Reading a manifest into rows to process: id, audio URI, raw sentence, normalized text.

Everything that can be wrong with the manifest as a whole is found here, before any Ray work
starts, and reported as one line. Problems of single rows become rejects instead.
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from preprocess import storage
from preprocess.text_normalization import TextNormalizer

COMMON_VOICE_COLUMNS = ("client_id", "path", "sentence")
DEFAULT_PASSTHROUGH = ("client_id", "gender", "age", "accents", "locale")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message is one line for the user."""


def _read_table(manifest: str) -> pa.Table:
    if not storage.exists(manifest):
        raise ManifestError(f"manifest not found: {manifest}")
    try:
        data = storage.read_bytes(manifest)
    except OSError as error:
        raise ManifestError(f"cannot read manifest {manifest}: {error}") from None
    extension = os.path.splitext(manifest)[1].lower()
    try:
        if extension in (".jsonl", ".json"):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            if not rows:
                raise ManifestError(f"manifest has no rows: {manifest}")
            columns = {key for row in rows for key in row}
            return pa.table(
                {c: [None if r.get(c) is None else str(r.get(c)) for r in rows] for c in columns}
            )
        if extension not in (".tsv", ".csv"):
            raise ManifestError(f"unknown manifest type {extension!r}: use .tsv, .csv or .jsonl")
        # Common Voice TSVs are written unquoted and sentences contain bare quote characters.
        parse = pacsv.ParseOptions(
            delimiter="\t" if extension == ".tsv" else ",",
            quote_char=False if extension == ".tsv" else '"',
        )
        header = pacsv.read_csv(
            io.BytesIO(data.split(b"\n", 1)[0] + b"\n"), parse_options=parse
        ).column_names
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=False
        )
        return pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
    except ManifestError:
        raise
    except (pa.ArrowInvalid, UnicodeDecodeError, json.JSONDecodeError) as error:
        first_line = str(error).splitlines()[0]
        raise ManifestError(f"cannot parse manifest {manifest}: {first_line}") from None


def read_manifest(
    manifest: str,
    normalizer: TextNormalizer,
    audio_column: str | None = None,
    text_column: str | None = None,
    id_column: str | None = None,
    audio_root: str | None = None,
    passthrough_columns: list[str] | None = None,
) -> pa.Table:
    """Rows with columns id, audio_uri, sentence, text and the passthrough metadata."""
    table = _read_table(manifest)
    is_common_voice = all(name in table.column_names for name in COMMON_VOICE_COLUMNS)
    audio_column = audio_column or ("path" if is_common_voice else None)
    text_column = text_column or ("sentence" if is_common_voice else None)
    if audio_column is None or text_column is None:
        raise ManifestError(
            f"{manifest} is not a Common Voice TSV: pass --audio_column and --text_column "
            f"(columns: {', '.join(table.column_names)})"
        )
    wanted = [audio_column, text_column] + ([id_column] if id_column else [])
    for name in wanted + list(passthrough_columns or []):
        if name not in table.column_names:
            raise ManifestError(
                f"column {name!r} not in {manifest} (columns: {', '.join(table.column_names)})"
            )
    if table.num_rows == 0:
        raise ManifestError(f"manifest has no rows: {manifest}")
    if audio_root is None:
        audio_root = storage.parent(manifest)
        if is_common_voice:
            audio_root = storage.join(audio_root, "clips")

    def strings(name: str) -> pa.ChunkedArray:
        # Arrow kernels, not a Python loop per row: a missing value reads as an empty string.
        return pc.fill_null(table.column(name).cast(pa.string()), "")

    audio_paths, sentences = strings(audio_column), strings(text_column)
    if passthrough_columns is None:
        passthrough_columns = [c for c in DEFAULT_PASSTHROUGH if c in table.column_names]
    join = storage.joiner(audio_root)
    columns = {
        "id": strings(id_column) if id_column else audio_paths,
        "audio_uri": pa.array(
            [join(path) if path else "" for path in audio_paths.to_pylist()], pa.string()
        ),
        "sentence": sentences,
        "text": pa.array([normalizer(sentence) for sentence in sentences.to_pylist()], pa.string()),
    }
    for name in passthrough_columns:
        if name not in columns:
            columns[name] = table.column(name).cast(pa.string())
    return pa.table(columns)
