"""Read corpora, queries, relevance judgments and product catalogs; validate; hash content.

Formats: BEIR folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), JSONL, CSV, TSV and
Parquet corpora, and product catalogs (CSV/Parquet with text fields and an image path column).
Everything is normalised to the corpus table of the data contract:
``doc_id, title, text, image, content_hash`` (+ ``attributes``, a JSON object of a catalog's
fields). Bad input raises :class:`DataError` naming the file, the line and what was expected;
empty documents are reported and left out.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
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
TEXT_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}


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


def content_hash(title: str, text: str, image_digest: str | None = None, attributes: str | None = None) -> str:
    payload = json.dumps([title, text, image_digest, attributes], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------- records


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
        raise DataError(path, line, f"bytes that are not UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(path, line_no, f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line") from None
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
            raise DataError(path, line_no, f"expected {len(header)} fields ({', '.join(header)}), found {len(row)}")
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
        raise DataError(path, None, f"unknown file type '{path.suffix}'; expected one of {sorted(TEXT_SUFFIXES)}")
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


def _unit(path: Path) -> str:
    return "row" if path.suffix.lower() in {".parquet", ".pq"} else "line"


def _pick(record: dict[str, Any], explicit: str | None, candidates: Sequence[str]) -> str | None:
    if explicit:
        return explicit
    return next((name for name in candidates if name in record), None)


def _as_text(path: Path, line: int, name: str, value: Any, *, required: bool) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        if required:
            raise DataError(path, line, f"field '{name}' is empty; expected a string", unit=_unit(path))
        return ""
    if isinstance(value, (dict, list)):
        raise DataError(path, line, f"field '{name}' is a {type(value).__name__}; expected a string", unit=_unit(path))
    return str(value)


# ----------------------------------------------------------------------------------------- corpus


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
    unit = _unit(path)
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    fields: tuple[str | None, str | None, str | None] | None = None
    for line, record in iter_records(path, fmt):
        if fields is None:
            fields = (
                _pick(record, id_field, ID_FIELDS),
                _pick(record, title_field, TITLE_FIELDS),
                _pick(record, text_field, TEXT_FIELDS),
            )
        id_name, title_name, text_name = fields
        if id_name is None or id_name not in record:
            raise DataError(path, line, f"no document id; expected a field named {id_field or ' or '.join(ID_FIELDS)}", unit=unit)
        if text_name is None or text_name not in record:
            raise DataError(path, line, f"no document text; expected a field named {text_field or ' or '.join(TEXT_FIELDS)}", unit=unit)
        doc_id = _as_text(path, line, id_name, record[id_name], required=True).strip()
        if not doc_id:
            raise DataError(path, line, f"field '{id_name}' (document id) is empty", unit=unit)
        if doc_id in seen:
            raise DataError(path, line, f"duplicate document id '{doc_id}' (first at {unit} {seen[doc_id]})", unit=unit)
        seen[doc_id] = line
        title = _as_text(path, line, title_name, record.get(title_name), required=False).strip() if title_name else ""
        text = _as_text(path, line, text_name, record[text_name], required=False).strip()
        if not text and not title:
            skipped.append(Skipped(str(path), line, doc_id, "empty document (no title and no text)"))
            continue
        rows.append({"doc_id": doc_id, "title": title, "text": text, "image": None,
                     "content_hash": content_hash(title, text), "attributes": None})
    return _finish(path, rows, skipped)


def _finish(path: Path, rows: list[dict[str, Any]], skipped: list[Skipped]) -> Corpus:
    if skipped:
        shown = "; ".join(f"{s.doc_id} ({_unit(path)} {s.line}): {s.reason}" for s in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning("%s: left out %d record(s): %s%s", path, len(skipped), shown, more)
    if not rows:
        raise DataError(path, None, "no usable documents in the file")
    docs = pd.DataFrame(rows, columns=CORPUS_COLUMNS)
    return Corpus(docs=docs, source=str(path), skipped=skipped)


# -------------------------------------------------------------------------------- queries, qrels


def read_queries(path: str | Path, *, id_field: str | None = None, text_field: str | None = None) -> pd.DataFrame:
    """Queries as a table ``query_id, text`` from JSONL (BEIR), CSV, TSV or Parquet."""
    path = Path(path)
    unit = _unit(path)
    rows: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for line, record in iter_records(path):
        id_name = _pick(record, id_field, QUERY_ID_FIELDS)
        text_name = _pick(record, text_field, ("text", "query"))
        if id_name is None or id_name not in record:
            raise DataError(path, line, f"no query id; expected a field named {' or '.join(QUERY_ID_FIELDS)}", unit=unit)
        if text_name is None or text_name not in record:
            raise DataError(path, line, "no query text; expected a field named text or query", unit=unit)
        query_id = _as_text(path, line, id_name, record[id_name], required=True).strip()
        text = _as_text(path, line, text_name, record[text_name], required=True).strip()
        if not query_id:
            raise DataError(path, line, "empty query id", unit=unit)
        if not text:
            raise DataError(path, line, f"query '{query_id}' has empty text", unit=unit)
        if query_id in seen:
            raise DataError(path, line, f"duplicate query id '{query_id}' (first at {unit} {seen[query_id]})", unit=unit)
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
            raise DataError(path, line_no, f"expected 3 tab-separated fields (query-id, corpus-id, score), found {len(parts)}")
        query_id, doc_id, score_text = (p.strip() for p in parts)
        try:
            score = int(float(score_text))
        except ValueError:
            raise DataError(path, line_no, f"score '{score_text}' is not a number") from None
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
        raise DataError(folder, None, "expected a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise DataError(qrels_path, None, f"no judgments for split '{split}'; available splits: {available or 'none'}")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    known_docs = set(corpus.ids) | {s.doc_id for s in corpus.skipped}
    qrels = read_qrels(qrels_path, query_ids=set(queries["query_id"]), doc_ids=known_docs)
    empty = {s.doc_id for s in corpus.skipped}
    if empty:  # judgments that point at left-out (empty) documents can never be retrieved
        qrels = {q: {d: g for d, g in docs.items() if d not in empty} for q, docs in qrels.items()}
        qrels = {q: docs for q, docs in qrels.items() if docs}
    queries = queries[queries["query_id"].isin(qrels)].reset_index(drop=True)
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, folder=str(folder), split=split)


# ---------------------------------------------------------------------------------------- catalog


def read_catalog(
    path: str | Path,
    *,
    id_field: str = "id",
    title_field: str | None = "productDisplayName",
    text_fields: Sequence[str] | None = None,
    image_field: str = "image",
    image_root: str | Path | None = None,
    missing_image: str = "error",
) -> Corpus:
    """A product catalog (CSV/TSV/Parquet with text fields and an image path column) as a corpus.

    ``text`` joins the text fields' values (default: every column but id, title and image);
    ``attributes`` keeps all fields as JSON for attribute queries. Image paths are taken relative
    to ``image_root`` (default: the catalog's folder, then its ``images/`` subfolder).
    ``missing_image``: "error" (DataError) or "skip" (report and leave the product out).
    """
    path = Path(path)
    if missing_image not in {"error", "skip"}:
        raise ValueError("missing_image must be 'error' or 'skip'")
    unit = _unit(path)
    roots = [Path(image_root)] if image_root else [path.parent, path.parent / "images"]
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for line, record in iter_records(path):
        for required in (id_field, image_field):
            if required not in record:
                raise DataError(path, line, f"no '{required}' column; columns are {sorted(record)}", unit=unit)
        fields = text_fields or [k for k in record if k not in {id_field, image_field, title_field}]
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataError(path, line, f"text field(s) {missing} not among the columns {sorted(record)}", unit=unit)
        doc_id = _as_text(path, line, id_field, record[id_field], required=True).strip()
        if not doc_id:
            raise DataError(path, line, f"field '{id_field}' (product id) is empty", unit=unit)
        if doc_id in seen:
            raise DataError(path, line, f"duplicate product id '{doc_id}' (first at {unit} {seen[doc_id]})", unit=unit)
        seen[doc_id] = line
        title = _as_text(path, line, title_field, record.get(title_field), required=False).strip() if title_field else ""
        values = {f: _as_text(path, line, f, record.get(f), required=False).strip() for f in fields}
        text = ", ".join(v for v in values.values() if v)
        image_name = _as_text(path, line, image_field, record[image_field], required=False).strip()
        image_path = _find_image(image_name, roots) if image_name else None
        if image_path is None:
            reason = f"image file '{image_name}' not found under {', '.join(map(str, roots))}" if image_name else "no image named"
            if missing_image == "error":
                raise DataError(path, line, reason, unit=unit)
            skipped.append(Skipped(str(path), line, doc_id, reason))
            continue
        if not text and not title:
            skipped.append(Skipped(str(path), line, doc_id, "empty product (no title and no text fields)"))
            continue
        attributes = json.dumps({"title": title, **values}, ensure_ascii=False, sort_keys=True)
        rows.append({
            "doc_id": doc_id, "title": title, "text": text, "image": str(image_path),
            "content_hash": content_hash(title, text, file_digest(image_path), attributes),
            "attributes": attributes,
        })
    return _finish(path, rows, skipped)


def read_products(path: str | Path) -> Corpus:
    """A catalog (a CSV/TSV/Parquet with an ``image`` column; products with a missing image are
    reported and left out) or else any corpus :func:`read_corpus` reads."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in {".csv", ".tsv", ".parquet"}:
        _, first = next(iter_records(path), (None, {}))
        if "image" in (first or {}):
            return read_catalog(path, missing_image="skip")
    return read_corpus(path)


def _find_image(name: str, roots: Sequence[Path]) -> Path | None:
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for root in roots:
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    return None


# ------------------------------------------------------------------------------- labelled data
# Training data for supervised fine-tuning, in three layouts (column names are found by the first
# match among the candidates below, or given explicitly):
#   pairs     text1, text2, label (0/1): duplicate-question pairs, the Quora layout;
#   groups    text, label (any value): items with the same label mean the same thing;
#   triplets  query, positive[, negative]: e.g. (query, clicked document) from a click log.

LABELLED_KINDS = ("pairs", "groups", "triplets")
PAIR_TEXT_FIELDS = (("text1", "text2"), ("question1", "question2"), ("sentence1", "sentence2"),
                    ("sentence_a", "sentence_b"), ("text_a", "text_b"))
PAIR_LABEL_FIELDS = ("label", "is_duplicate", "is_paraphrase", "duplicate")
GROUP_TEXT_FIELDS = ("text", "sentence", "question", "title")
GROUP_LABEL_FIELDS = ("label", "group", "group_id", "cluster", "cluster_id", "class")
QUERY_FIELDS = ("query", "anchor", "question")
POSITIVE_FIELDS = ("positive", "pos", "document", "passage", "answer")
NEGATIVE_FIELDS = ("negative", "neg", "hard_negative")
_LABEL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}


@dataclass
class LabelledData:
    """Labelled training or evaluation rows of one layout, with the line each row came from.

    ``rows`` columns: pairs ``text1, text2, label`` (int 0/1); groups ``text, label`` (str);
    triplets ``query, positive, negative`` (negative is None where the file has none); all
    have ``line`` (the 1-based line or row of the file).
    """

    kind: str
    rows: pd.DataFrame
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def texts(self) -> list[str]:
        """Every distinct text, in order of first appearance."""
        columns = {"pairs": ["text1", "text2"], "groups": ["text"], "triplets": ["query", "positive", "negative"]}
        seen: dict[str, None] = {}
        for row in self.rows[columns[self.kind]].itertuples(index=False):
            for text in row:
                if text is not None and text not in seen:
                    seen[text] = None
        return list(seen)

    def subset(self, mask: Any) -> LabelledData:
        return LabelledData(self.kind, self.rows[mask].reset_index(drop=True), self.source)

    @property
    def key(self) -> str:
        """Content key of the rows: changes when any row is added, removed or edited."""
        digest = hashlib.sha256(self.kind.encode())
        columns = [c for c in self.rows.columns if c != "line"]
        for row in self.rows[columns].itertuples(index=False):
            digest.update(json.dumps(list(row), ensure_ascii=False, default=str).encode("utf-8") + b"\n")
        return digest.hexdigest()[:20]


def _first_record(path: Path, fmt: str | None) -> tuple[int, dict[str, Any]]:
    for line, record in iter_records(path, fmt):
        return line, record
    raise DataError(path, None, "no rows in the file; expected a header and labelled rows")


def _column(path: Path, line: int, record: dict[str, Any], explicit: str | None, candidates: Sequence[str],
            what: str) -> str:
    """The column holding ``what``: the explicit name, else the first candidate present."""
    name = _pick(record, explicit, candidates)
    if name is None or name not in record:
        wanted = f"'{explicit}'" if explicit else " or ".join(f"'{c}'" for c in candidates)
        raise _no_column(path, line, record, f"no {what} column; expected a column named {wanted}")
    return name


def _no_column(path: Path, line: int, record: dict[str, Any], message: str) -> DataError:
    """A missing column is reported at the header of a CSV/TSV file, else at the first record."""
    where = 1 if path.suffix.lower() in {".tsv", ".csv"} else line
    return DataError(path, where, f"{message}; found {', '.join(map(repr, record))}", unit=_unit(path))


def _required_text(path: Path, line: int, name: str, value: Any) -> str:
    text = _as_text(path, line, name, value, required=True).strip()
    if not text:
        raise DataError(path, line, f"field '{name}' is empty; expected a text", unit=_unit(path))
    return text


def _binary_label(path: Path, line: int, name: str, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    key = str(value).strip().lower() if value is not None else ""
    if key not in _LABEL_VALUES:
        raise DataError(path, line, f"field '{name}' is {str(value)!r}; expected a label 0 or 1", unit=_unit(path))
    return _LABEL_VALUES[key]


def read_labelled_pairs(
    path: str | Path,
    *,
    text1_field: str | None = None,
    text2_field: str | None = None,
    label_field: str | None = None,
    fmt: str | None = None,
) -> LabelledData:
    """Pairs of texts with a 0/1 label (1: they mean the same), e.g. Quora question pairs."""
    path = Path(path)
    first_line, first = _first_record(path, fmt)
    if text1_field is None and text2_field is None:
        found = next((p for p in PAIR_TEXT_FIELDS if p[0] in first and p[1] in first), None)
        if found is None:
            wanted = " or ".join(f"'{a}', '{b}'" for a, b in PAIR_TEXT_FIELDS)
            raise _no_column(path, first_line, first, f"no pair of text columns; expected {wanted}")
        text1_field, text2_field = found
    names = (_column(path, first_line, first, text1_field, (), "first text"),
             _column(path, first_line, first, text2_field, (), "second text"),
             _column(path, first_line, first, label_field, PAIR_LABEL_FIELDS, "label (0/1)"))
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        rows.append((_required_text(path, line, names[0], record[names[0]]),
                     _required_text(path, line, names[1], record[names[1]]),
                     _binary_label(path, line, names[2], record[names[2]]), line))
    return _labelled(path, "pairs", rows, ["text1", "text2", "label", "line"])


def read_label_groups(
    path: str | Path,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    fmt: str | None = None,
) -> LabelledData:
    """Texts with a group label: texts sharing a label are duplicates of each other."""
    path = Path(path)
    first_line, first = _first_record(path, fmt)
    names = (_column(path, first_line, first, text_field, GROUP_TEXT_FIELDS, "text"),
             _column(path, first_line, first, label_field, GROUP_LABEL_FIELDS, "group label"))
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        rows.append((_required_text(path, line, names[0], record[names[0]]),
                     _required_text(path, line, names[1], record[names[1]]), line))
    data = _labelled(path, "groups", rows, ["text", "label", "line"])
    if data.rows["label"].value_counts().max() < 2:
        raise DataError(path, None, "no label is shared by two texts; expected groups of at least two "
                                    "texts with the same label")
    return data


def read_query_pairs(
    path: str | Path,
    *,
    query_field: str | None = None,
    positive_field: str | None = None,
    negative_field: str | None = None,
    fmt: str | None = None,
) -> LabelledData:
    """(query, positive[, negative]) rows: the positive answers the query, the negative does not."""
    path = Path(path)
    first_line, first = _first_record(path, fmt)
    names = (_column(path, first_line, first, query_field, QUERY_FIELDS, "query"),
             _column(path, first_line, first, positive_field, POSITIVE_FIELDS, "positive"))
    negative = negative_field or _pick(first, None, NEGATIVE_FIELDS)
    if negative_field:
        _column(path, first_line, first, negative_field, (), "negative")
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        neg = None
        if negative is not None:
            _require_fields(path, line, record, (negative,))
            neg = _required_text(path, line, negative, record[negative])
        rows.append((_required_text(path, line, names[0], record[names[0]]),
                     _required_text(path, line, names[1], record[names[1]]), neg, line))
    return _labelled(path, "triplets", rows, ["query", "positive", "negative", "line"])


def detect_labelled_kind(path: str | Path, fmt: str | None = None) -> str:
    """Which layout a labelled file has, from its column names."""
    path = Path(path)
    first_line, first = _first_record(path, fmt)
    if any(a in first and b in first for a, b in PAIR_TEXT_FIELDS) and _pick(first, None, PAIR_LABEL_FIELDS):
        return "pairs"
    if _pick(first, None, QUERY_FIELDS) and _pick(first, None, POSITIVE_FIELDS):
        return "triplets"
    if _pick(first, None, GROUP_TEXT_FIELDS) and _pick(first, None, GROUP_LABEL_FIELDS):
        return "groups"
    raise _no_column(path, first_line, first, (
        "cannot tell the layout from the column names; expected labelled pairs (text1, text2, label), label "
        "groups (text, label) or query pairs (query, positive[, negative])"))


def read_labelled(path: str | Path, kind: str = "auto", fmt: str | None = None) -> LabelledData:
    """A labelled file of any of the three layouts (``kind`` "auto" tells them by column names)."""
    if kind == "auto":
        kind = detect_labelled_kind(path, fmt)
    readers = {"pairs": read_labelled_pairs, "groups": read_label_groups, "triplets": read_query_pairs}
    if kind not in readers:
        raise ValueError(f"kind must be 'auto' or one of {LABELLED_KINDS}, not {kind!r}")
    return readers[kind](path, fmt=fmt)


def _require_fields(path: Path, line: int, record: dict[str, Any], names: Sequence[str]) -> None:
    for name in names:
        if name not in record:  # JSONL records may each have their own fields
            raise DataError(path, line, f"no '{name}' field; expected it as in the first record", unit=_unit(path))


def _labelled(path: Path, kind: str, rows: list[tuple], columns: list[str]) -> LabelledData:
    if not rows:
        raise DataError(path, None, "no labelled rows in the file")
    table = pd.DataFrame(rows, columns=columns)
    if kind == "pairs":
        table["label"] = table["label"].astype("int64")
    return LabelledData(kind=kind, rows=table, source=str(path))


# ---------------------------------------------------------------------------------- Prefect tasks

from prefect import task  # noqa: E402

read_beir_task = task(read_beir, name="read-beir", task_run_name="read {folder} [{split}]")
read_corpus_task = task(read_corpus, name="read-corpus")
read_catalog_task = task(read_catalog, name="read-catalog")
