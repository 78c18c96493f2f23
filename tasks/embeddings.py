"""A persistent embedding cache: every text is encoded once per (model, max sequence length).

Corpus documents, generated queries and training passages all go through it, so a stage that
needs an embedding another stage already computed (the consistency filter, mining, the teacher,
the "before" evaluation) reads it instead of encoding again, across runs and after a crash.

Layout: ``<workspace>/cache/embeddings/<model fingerprint>-<max_seq_length>/part-*.parquet``
(``text_hash``, ``embedding``); parts are written atomically as encoding goes, so a crash loses
at most the chunk being encoded. Written by hand because sentence-transformers' own cache
(``mine_hard_negatives(cache_folder=...)``) keys a whole list of texts, not each text.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.store import write_parquet_atomic

log = logging.getLogger(__name__)


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Unit-length embeddings of texts under one model and max sequence length."""

    def __init__(self, workspace: str | Path, model: Any, fingerprint: str, *, max_seq_length: int,
                 batch_size: int = 64, chunk_size: int = 2048):
        self.folder = Path(workspace) / "cache" / "embeddings" / f"{fingerprint}-{max_seq_length}"
        self.model = model
        self.fingerprint = fingerprint
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.vectors: dict[bytes, np.ndarray] = {}
        self.encoded = 0
        self.seconds = 0.0
        self._load()

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            column = table.column("embedding").combine_chunks()
            matrix = column.values.to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
            self.vectors.update(zip(table.column("text_hash").to_pylist(), matrix.astype(np.float32), strict=True))

    def __contains__(self, text: str) -> bool:
        return text_hash(text) in self.vectors

    def embed(self, texts: Sequence[str], *, progress: Callable[[int, int], None] | None = None,
              desc: str = "encoding") -> np.ndarray:
        """Embeddings of ``texts`` (rows in order); only texts never seen before are encoded."""
        from tasks.evaluate import encode_texts

        hashes = [text_hash(t) for t in texts]
        missing = list(dict.fromkeys(h for h in hashes if h not in self.vectors))
        if missing:
            by_hash = {h: t for h, t in zip(hashes, texts, strict=True)}
            log.info("%s: %d new texts (%d cached)", desc, len(missing), len(set(hashes)) - len(missing))
            self.model.max_seq_length = self.max_seq_length
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start:start + self.chunk_size]
                began = time.time()
                vectors = encode_texts(self.model, [by_hash[h] for h in chunk], batch_size=self.batch_size,
                                       show_progress=False, desc=desc)
                self.seconds += time.time() - began
                self.encoded += len(chunk)
                self._append(chunk, vectors)
                if progress:
                    progress(min(start + self.chunk_size, len(missing)), len(missing))
        if not texts:
            return np.zeros((0, self.dimension()), dtype=np.float32)
        return np.stack([self.vectors[h] for h in hashes])

    def dimension(self) -> int:
        if self.vectors:
            return len(next(iter(self.vectors.values())))
        return int(self.model.get_embedding_dimension())

    def _append(self, hashes: list[bytes], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors.update(zip(hashes, vectors, strict=True))
        flat = pa.array(vectors.reshape(-1))
        table = pa.table({"text_hash": pa.array(hashes, type=pa.binary(16)),
                          "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns()}-{len(hashes)}.parquet"
        write_parquet_atomic(self.folder / name, table)
