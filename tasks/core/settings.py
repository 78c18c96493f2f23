"""Helpers for the pydantic settings models of the flows and commands (the single source of defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.corpus import DataError, qrels_path_of


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``, nested mappings merged key by key (``extra`` wins)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def require_path(path: Path, what: str, *, kind: str = "file") -> None:
    """Fail at once, naming the path, when an input ``kind`` ("file", "folder", ...) does not exist."""
    if not Path(path).exists():
        raise DataError(path, None, f"{kind} not found; expected {what}")


def require_beir_split(folder: Path, split: str) -> None:
    """A BEIR folder with queries.jsonl and qrels/<split>.tsv, checked without reading them."""
    require_path(folder, "a BEIR folder (queries.jsonl, qrels/<split>.tsv)", kind="folder")
    require_path(Path(folder) / "queries.jsonl", "the queries of the BEIR folder")
    qrels_path_of(Path(folder), split)
