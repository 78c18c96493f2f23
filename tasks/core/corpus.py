"""Read corpora, queries, relevance judgments and product catalogs; validate; hash content.

Formats: BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), JSONL, CSV, TSV and
Parquet corpora, and product catalogs (CSV/Parquet with text fields and an image path column).
Everything is normalised to the corpus table of the data contract:
``doc_id, title, text, image, content_hash`` (+ ``attributes``, a JSON object of a catalog's
fields). Bad input raises :class:`DataError` naming the file, the line and what was expected;
empty documents are reported and left out. Labelled data (pairs, groups, query/positive rows) has
its own readers in :mod:`tasks.labelled.readers`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


ID_FIELDS = ("_id", "doc_id", "id", "corpus-id", "corpus_id")


QUERY_ID_FIELDS = ("_id", "query_id", "id", "query-id", "qid")


TEXT_FIELDS = ("text", "body", "content", "abstract", "passage")


TITLE_FIELDS = ("title",)


CORPUS_COLUMNS = ["doc_id", "title", "text", "image", "content_hash", "attributes"]


TEXT_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class DataError(ValueError):
    """Bad input: which file, which line (or row), and what was expected."""

    def __init__(self, file: str | Path, line: int | None, message: str, *, unit: str = "line"):
        self.file = str(file)
        self.line = line
        self.message = message
        where = f"{self.file}, {unit} {line}" if line is not None else self.file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Skipped:
    """A record left out of a corpus, and why."""

    file: str
    line: int
    doc_id: str
    reason: str


@dataclass
class Corpus:
    """A normalised corpus table plus what was left out of it."""

    docs: pd.DataFrame
    source: str
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def ids(self) -> list[str]:
        return self.docs["doc_id"].tolist()

    def texts(self) -> list[str]:
        """Title and text as one passage: what a bi-encoder or BM25 indexes."""
        return document_texts(self.docs)

    @property
    def key(self) -> str:
        """Content key of the whole corpus: changes when any document is added, removed or edited."""
        digest = hashlib.sha256()
        for doc_id, content in zip(self.docs["doc_id"], self.docs["content_hash"], strict=True):
            digest.update(f"{doc_id}\x1f{content}\n".encode())
        return digest.hexdigest()[:20]


def document_texts(docs: pd.DataFrame) -> list[str]:
    return [f"{t} {x}".strip() if t else x for t, x in zip(docs["title"], docs["text"], strict=True)]


@dataclass
class BeirData:
    """A BEIR folder's corpus with the queries and judgments of one split."""

    corpus: Corpus
    queries: pd.DataFrame  # query_id, text: only queries that have judgments in this split
    qrels: dict[str, dict[str, int]]
    folder: str
    split: str
    # judgments naming a document the reader left out (empty): dropped, since it can never be retrieved
    dropped_judgments: int = 0


def content_hash(
    title: str, text: str, image_digest: str | None = None, attributes: str | None = None
) -> str:
    payload = json.dumps([title, text, image_digest, attributes], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


def _decode(path: Path) -> str:
    """The file as text; undecodable bytes are a DataError at their line, not a traceback."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, None, "expected a file, found a directory") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            path, line, f"bytes that are not UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                path,
                line_no,
                f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line",
            ) from None
        if not isinstance(record, dict):
            raise DataError(path, line_no, f"expected a JSON object, found {type(record).__name__}")
        yield line_no, record


def _delimited_records(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _decode(path)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(path, 1, "empty file; expected a header row") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        raise DataError(path, 1, f"duplicate column names in header {header}")
    kind = "TSV" if delimiter == "\t" else "CSV"
    previous = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(path, previous + 1, f"malformed {kind}: {exc}") from None
        line_no, previous = previous + 1, reader.line_num  # a quoted field may span several lines
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(
                path, line_no, f"expected {len(header)} fields ({', '.join(header)}), found {len(row)}"
            )
        yield line_no, dict(zip(header, row, strict=True))


def _parquet_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(path, None, f"not a readable Parquet file: {exc}") from None
    yield from enumerate(table.to_pylist(), start=1)


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    kind = TEXT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            path, None, f"unknown file type '{path.suffix}'; expected one of {sorted(TEXT_SUFFIXES)}"
        )
    return kind


def iter_records(path: str | Path, fmt: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) pairs of a JSONL, CSV, TSV or Parquet file."""
    path = Path(path)
    kind = _format_of(path, fmt)
    if kind == "jsonl":
        return _jsonl_records(path)
    if kind == "parquet":
        return _parquet_records(path)
    return _delimited_records(path, "\t" if kind == "tsv" else ",")


def record_unit(path: Path) -> str:
    return "row" if path.suffix.lower() in {".parquet", ".pq"} else "line"


def pick_field(record: dict[str, Any], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit
    return next((name for name in candidates if name in record), None)


def require_field(
    path: Path, line: int, record: dict[str, Any], name: str | None, what: str, expected: Sequence[str]
) -> str:
    """``name`` when ``record`` has that field, else a DataError: no <what>; expected a field named ..."""
    if name is None or name not in record:
        raise DataError(
            path, line, f"no {what}; expected a field named {' or '.join(expected)}", unit=record_unit(path)
        )
    return name


def field_text(path: Path, line: int, name: str, value: Any, *, required: bool) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        if required:
            raise DataError(path, line, f"field '{name}' is empty; expected a string", unit=record_unit(path))
        return ""
    if isinstance(value, (dict, list)):
        raise DataError(
            path,
            line,
            f"field '{name}' is a {type(value).__name__}; expected a string",
            unit=record_unit(path),
        )
    return str(value)


def read_corpus(
    path: str | Path,
    *,
    id_field: str | None = None,
    title_field: str | None = None,
    text_field: str | None = None,
    fmt: str | None = None,
) -> Corpus:
    """A corpus from a BEIR folder or a JSONL/CSV/TSV/Parquet file of documents."""
    path = Path(path)
    if path.is_dir():
        path = path / "corpus.jsonl"
        if not path.is_file():
            raise DataError(path.parent, None, "a corpus folder must hold corpus.jsonl (BEIR layout)")
    unit = record_unit(path)
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    fields: tuple[str | None, str | None, str | None] | None = None
    for line, record in iter_records(path, fmt):
        if fields is None:
            fields = (
                pick_field(record, id_field, ID_FIELDS),
                pick_field(record, title_field, TITLE_FIELDS),
                pick_field(record, text_field, TEXT_FIELDS),
            )
        id_name, title_name, text_name = fields
        require_field(path, line, record, id_name, "document id", [id_field] if id_field else ID_FIELDS)
        require_field(
            path, line, record, text_name, "document text", [text_field] if text_field else TEXT_FIELDS
        )
        doc_id = field_text(path, line, id_name, record[id_name], required=True).strip()
        if not doc_id:
            raise DataError(path, line, f"field '{id_name}' (document id) is empty", unit=unit)
        if doc_id in seen:
            raise DataError(
                path, line, f"duplicate document id '{doc_id}' (first at {unit} {seen[doc_id]})", unit=unit
            )
        seen[doc_id] = line
        title = (
            field_text(path, line, title_name, record.get(title_name), required=False).strip()
            if title_name
            else ""
        )
        text = field_text(path, line, text_name, record[text_name], required=False).strip()
        if not text and not title:
            skipped.append(Skipped(str(path), line, doc_id, "empty document (no title and no text)"))
            continue
        rows.append(
            {
                "doc_id": doc_id,
                "title": title,
                "text": text,
                "image": None,
                "content_hash": content_hash(title, text),
                "attributes": None,
            }
        )
    return finish_corpus(path, rows, skipped)


def finish_corpus(path: Path, rows: list[dict[str, Any]], skipped: list[Skipped]) -> Corpus:
    if skipped:
        shown = "; ".join(f"{s.doc_id} ({record_unit(path)} {s.line}): {s.reason}" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("%s: left out %d record(s): %s%s", path, len(skipped), shown, more)
    if not rows:
        raise DataError(path, None, "no usable documents in the file")
    docs = pd.DataFrame(rows, columns=CORPUS_COLUMNS)
    return Corpus(docs=docs, source=str(path), skipped=skipped)


def read_queries(
    path: str | Path, *, id_field: str | None = None, text_field: str | None = None
) -> pd.DataFrame:
    """Queries as a table ``query_id, text`` from JSONL (BEIR), CSV, TSV or Parquet."""
    path = Path(path)
    unit = record_unit(path)
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for line, record in iter_records(path):
        id_name = require_field(
            path, line, record, pick_field(record, id_field, QUERY_ID_FIELDS), "query id", QUERY_ID_FIELDS
        )
        text_name = require_field(
            path,
            line,
            record,
            pick_field(record, text_field, ("text", "query")),
            "query text",
            ("text", "query"),
        )
        query_id = field_text(path, line, id_name, record[id_name], required=True).strip()
        text = field_text(path, line, text_name, record[text_name], required=True).strip()
        if not query_id:
            raise DataError(path, line, "empty query id", unit=unit)
        if not text:
            raise DataError(path, line, f"query '{query_id}' has empty text", unit=unit)
        if query_id in seen:
            raise DataError(
                path, line, f"duplicate query id '{query_id}' (first at {unit} {seen[query_id]})", unit=unit
            )
        seen[query_id] = line
        rows.append((query_id, text))
    return pd.DataFrame(rows, columns=["query_id", "text"])


def read_qrels(
    path: str | Path,
    *,
    query_ids: set[str] | None = None,
    doc_ids: set[str] | None = None,
) -> dict[str, dict[str, int]]:
    """Relevance judgments (TSV: query-id, corpus-id, score; header optional) as {query: {doc: grade}}."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for line_no, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r").split("\t")
        if line_no == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid", "query"}:
            continue
        if len(parts) == 4:  # TREC qrels: query, iteration, doc, grade
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise DataError(
                path,
                line_no,
                f"expected 3 tab-separated fields (query-id, corpus-id, score), found {len(parts)}",
            )
        query_id, doc_id, score_text = (p.strip() for p in parts)
        try:
            value = float(score_text)
        except ValueError:
            raise DataError(path, line_no, f"score '{score_text}' is not a number") from None
        if not math.isfinite(value):
            raise DataError(
                path,
                line_no,
                f"score '{score_text}' is not a finite number; expected a grade such as 0, 1 or 2",
            )
        score = int(value)
        if query_ids is not None and query_id not in query_ids:
            raise DataError(path, line_no, f"query id '{query_id}' is not among the queries")
        if doc_ids is not None and doc_id not in doc_ids:
            raise DataError(path, line_no, f"corpus id '{doc_id}' is not in the corpus")
        qrels.setdefault(query_id, {})[doc_id] = score
    if not qrels:
        raise DataError(path, None, "no relevance judgments in the file")
    return qrels


def read_beir(folder: str | Path, split: str = "test") -> BeirData:
    """A BEIR folder: corpus, and the queries and qrels of one split (queries without qrels dropped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            folder, None, "expected a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)"
        )
    qrels_path_of(folder, split)
    return read_judged_queries(folder, split, read_corpus(folder / "corpus.jsonl"))


def qrels_path_of(folder: Path, split: str) -> Path:
    """``qrels/<split>.tsv`` of a BEIR folder; DataError naming the splits there when it is missing."""
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = (
            sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        )
        raise DataError(
            qrels_path, None, f"no judgments for split '{split}'; available splits: {available or 'none'}"
        )
    return qrels_path


def read_judged_queries(folder: str | Path, split: str, corpus: Corpus) -> BeirData:
    """The queries and judgments of a BEIR folder's split (``queries.jsonl``, ``qrels/<split>.tsv``) over
    ``corpus``. Judgments naming a document the reader left out (empty) are dropped, since it can never
    be retrieved; judgments naming ids that never existed are errors. Queries left without judgments
    are dropped."""
    folder = Path(folder)
    qrels_path = qrels_path_of(folder, split)
    queries = read_queries(folder / "queries.jsonl")
    known_docs = set(corpus.ids) | {s.doc_id for s in corpus.skipped}
    qrels = read_qrels(qrels_path, query_ids=set(queries["query_id"]), doc_ids=known_docs)
    empty = {s.doc_id for s in corpus.skipped}
    dropped = 0
    if empty:  # judgments that point at left-out (empty) documents can never be retrieved
        dropped = sum(d in empty for docs in qrels.values() for d in docs)
        qrels = {q: {d: g for d, g in docs.items() if d not in empty} for q, docs in qrels.items()}
        qrels = {q: docs for q, docs in qrels.items() if docs}
        if dropped:
            log.warning(
                "%s: %d judgment(s) name a document left out of the corpus (empty); not evaluated",
                qrels_path,
                dropped,
            )
    queries = queries[queries["query_id"].isin(qrels)].reset_index(drop=True)
    return BeirData(
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        folder=str(folder),
        split=split,
        dropped_judgments=dropped,
    )
