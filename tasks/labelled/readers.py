"""Readers of labelled data: duplicate pairs, label groups and query/positive[/negative] rows.

The layout is told from the column names (``text1, text2, label``; ``text, label``;
``query, positive[, negative]``, with the usual aliases) or named explicitly. Every reader
returns a :class:`LabelledData`; bad input raises :class:`tasks.core.corpus.DataError` with the
file, the line and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.corpus import DataError, field_text, iter_records, pick_field, record_unit

log = logging.getLogger(__name__)


LABELLED_KINDS = ("pairs", "groups", "triplets")


PAIR_TEXT_FIELDS = (
    ("text1", "text2"),
    ("question1", "question2"),
    ("sentence1", "sentence2"),
    ("sentence_a", "sentence_b"),
    ("text_a", "text_b"),
)


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
        columns = {
            "pairs": ["text1", "text2"],
            "groups": ["text"],
            "triplets": ["query", "positive", "negative"],
        }
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


def _column(
    path: Path, line: int, record: dict[str, Any], explicit: str | None, candidates: Sequence[str], what: str
) -> str:
    """The column holding ``what``: the explicit name, else the first candidate present."""
    name = pick_field(record, explicit, candidates)
    if name is None or name not in record:
        wanted = f"'{explicit}'" if explicit else " or ".join(f"'{c}'" for c in candidates)
        raise _no_column(path, line, record, f"no {what} column; expected a column named {wanted}")
    return name


def _no_column(path: Path, line: int, record: dict[str, Any], message: str) -> DataError:
    """A missing column is reported at the header of a CSV/TSV file, else at the first record."""
    where = 1 if path.suffix.lower() in {".tsv", ".csv"} else line
    return DataError(path, where, f"{message}; found {', '.join(map(repr, record))}", unit=record_unit(path))


def _required_text(path: Path, line: int, name: str, value: Any) -> str:
    text = field_text(path, line, name, value, required=True).strip()
    if not text:
        raise DataError(path, line, f"field '{name}' is empty; expected a text", unit=record_unit(path))
    return text


def _binary_label(path: Path, line: int, name: str, value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    key = str(value).strip().lower() if value is not None else ""
    if key not in _LABEL_VALUES:
        raise DataError(
            path, line, f"field '{name}' is {str(value)!r}; expected a label 0 or 1", unit=record_unit(path)
        )
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
    names = (
        _column(path, first_line, first, text1_field, (), "first text"),
        _column(path, first_line, first, text2_field, (), "second text"),
        _column(path, first_line, first, label_field, PAIR_LABEL_FIELDS, "label (0/1)"),
    )
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        rows.append(
            (
                _required_text(path, line, names[0], record[names[0]]),
                _required_text(path, line, names[1], record[names[1]]),
                _binary_label(path, line, names[2], record[names[2]]),
                line,
            )
        )
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
    names = (
        _column(path, first_line, first, text_field, GROUP_TEXT_FIELDS, "text"),
        _column(path, first_line, first, label_field, GROUP_LABEL_FIELDS, "group label"),
    )
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        rows.append(
            (
                _required_text(path, line, names[0], record[names[0]]),
                _required_text(path, line, names[1], record[names[1]]),
                line,
            )
        )
    data = _labelled(path, "groups", rows, ["text", "label", "line"])
    if data.rows["label"].value_counts().max() < 2:
        raise DataError(
            path,
            None,
            "no label is shared by two texts; expected groups of at least two texts with the same label",
        )
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
    names = (
        _column(path, first_line, first, query_field, QUERY_FIELDS, "query"),
        _column(path, first_line, first, positive_field, POSITIVE_FIELDS, "positive"),
    )
    negative = negative_field or pick_field(first, None, NEGATIVE_FIELDS)
    if negative_field:
        _column(path, first_line, first, negative_field, (), "negative")
    rows = []
    for line, record in iter_records(path, fmt):
        _require_fields(path, line, record, names)
        neg = None
        if negative is not None:
            _require_fields(path, line, record, (negative,))
            neg = _required_text(path, line, negative, record[negative])
        rows.append(
            (
                _required_text(path, line, names[0], record[names[0]]),
                _required_text(path, line, names[1], record[names[1]]),
                neg,
                line,
            )
        )
    return _labelled(path, "triplets", rows, ["query", "positive", "negative", "line"])


def detect_labelled_kind(path: str | Path, fmt: str | None = None) -> str:
    """Which layout a labelled file has, from its column names."""
    path = Path(path)
    first_line, first = _first_record(path, fmt)
    if any(a in first and b in first for a, b in PAIR_TEXT_FIELDS) and pick_field(
        first, None, PAIR_LABEL_FIELDS
    ):
        return "pairs"
    if pick_field(first, None, QUERY_FIELDS) and pick_field(first, None, POSITIVE_FIELDS):
        return "triplets"
    if pick_field(first, None, GROUP_TEXT_FIELDS) and pick_field(first, None, GROUP_LABEL_FIELDS):
        return "groups"
    raise _no_column(
        path,
        first_line,
        first,
        (
            "cannot tell the layout from the column names; expected labelled pairs (text1, text2, label), label "
            "groups (text, label) or query pairs (query, positive[, negative])"
        ),
    )


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
            raise DataError(
                path, line, f"no '{name}' field; expected it as in the first record", unit=record_unit(path)
            )


def _labelled(path: Path, kind: str, rows: list[tuple], columns: list[str]) -> LabelledData:
    if not rows:
        raise DataError(path, None, "no labelled rows in the file")
    table = pd.DataFrame(rows, columns=columns)
    if kind == "pairs":
        table["label"] = table["label"].astype("int64")
    return LabelledData(kind=kind, rows=table, source=str(path))
