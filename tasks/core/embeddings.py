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
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.corpus import Corpus
from tasks.core.parts import ENCODE_PART_SIZE, LOCAL, PartRunner, built_once, resumed_progress
from tasks.core.store import StageRef, Store, chunked, part_name, stage_key, write_parquet_atomic

log = logging.getLogger(__name__)


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
    """Unit-length embeddings of texts under one model and max sequence length."""

    def __init__(
        self,
        workspace: str | Path,
        model: Any,
        fingerprint: str,
        *,
        max_seq_length: int,
        batch_size: int = 64,
        chunk_size: int = 2048,
        encode: Callable[[list[str]], np.ndarray] | None = None,
        name: str | None = None,
        spec: Any = None,
    ):
        """``model`` is a sentence-transformers model, encoded at ``max_seq_length``; or give ``encode``
        (texts -> unit rows) for any other text encoder (a catalog encoder's text tower), with ``name``
        for its cache folder (default ``<fingerprint>-<max_seq_length>``). ``spec``
        (:class:`tasks.core.parts.CacheSpec`) says how a worker process builds the same cache; a
        cache without one encodes only in its own process."""
        self.folder = Path(workspace) / "cache" / "embeddings" / (name or f"{fingerprint}-{max_seq_length}")
        self.model = model
        self.encode = encode
        self.fingerprint = fingerprint
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.spec = spec
        self.vectors: dict[bytes, np.ndarray] = {}
        self.encoded = 0
        self.seconds = 0.0
        self._loaded: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Read the parts of the cache folder not read yet (written by another process since)."""
        if not self.folder.is_dir():
            return
        for part in sorted(self.folder.glob("part-*.parquet")):
            if part.name in self._loaded:
                continue
            self._loaded.add(part.name)
            table = pq.read_table(part)
            column = table.column("embedding").combine_chunks()
            matrix = column.values.to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)
            self.vectors.update(
                zip(table.column("text_hash").to_pylist(), matrix.astype(np.float32), strict=True)
            )

    def __contains__(self, text: str) -> bool:
        return text_hash(text) in self.vectors

    def embed(
        self,
        texts: Sequence[str],
        *,
        progress: Callable[[int, int], None] | None = None,
        desc: str = "encoding",
    ) -> np.ndarray:
        """Embeddings of ``texts`` (rows in order); only texts never seen before are encoded."""
        hashes = [text_hash(t) for t in texts]
        missing = list(dict.fromkeys(h for h in hashes if h not in self.vectors))
        if missing:
            by_hash = {h: t for h, t in zip(hashes, texts, strict=True)}
            log.info("%s: %d new texts (%d cached)", desc, len(missing), len(set(hashes)) - len(missing))
            if self.encode is None:
                self.model.max_seq_length = self.max_seq_length
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start : start + self.chunk_size]
                began = time.time()
                if self.encode is not None:
                    vectors = self.encode([by_hash[h] for h in chunk])
                else:
                    vectors = encode_texts(
                        self.model,
                        [by_hash[h] for h in chunk],
                        batch_size=self.batch_size,
                        show_progress=False,
                        desc=desc,
                    )
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
        if self.model is None:  # an ``encode`` function: ask it
            return int(np.asarray(self.encode([""])).shape[1])
        return int(self.model.get_embedding_dimension())

    def _append(self, hashes: list[bytes], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.vectors.update(zip(hashes, vectors, strict=True))
        flat = pa.array(vectors.reshape(-1))
        table = pa.table(
            {
                "text_hash": pa.array(hashes, type=pa.binary(16)),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
            }
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        # the process id keeps two workers that write in the same nanosecond apart
        name = f"part-{time.time_ns()}-{os.getpid()}-{len(hashes)}.parquet"
        write_parquet_atomic(self.folder / name, table)
        self._loaded.add(name)


@dataclass(frozen=True)
class CacheSpec:
    """How to rebuild an :class:`tasks.core.embeddings.EmbeddingCache` in another process: the
    model's folder and fingerprint, the length, the batch size and the backend (pytorch or ONNX)."""

    workspace: str
    model_dir: str
    fingerprint: str
    max_seq_length: int
    batch_size: int = 64
    backend: str = "pytorch"
    name: str | None = None

    def build(self) -> Any:
        """The cache, built once per process (the model is loaded on first use here)."""
        return built_once(("cache", self), self._build)

    def _build(self) -> Any:
        from tasks.core.models import load_sentence_transformer
        from tasks.core.onnx import fast_encode

        encode = fast_encode(
            self.model_dir,
            self.fingerprint,
            self.workspace,
            backend=self.backend,
            max_seq_length=self.max_seq_length,
        )
        model = None if encode is not None else load_sentence_transformer(self.model_dir)
        return EmbeddingCache(
            self.workspace,
            model,
            self.fingerprint,
            max_seq_length=self.max_seq_length,
            batch_size=self.batch_size,
            encode=encode,
            name=self.name,
            spec=self,
        )


def cache_for(
    model: Any,
    workspace: str | Path,
    *,
    max_seq_length: int,
    reuse: EmbeddingCache | None = None,
    batch_size: int = 64,
) -> EmbeddingCache:
    """The embedding cache of a resolved model (:class:`tasks.core.models.ResolvedModel`): ``reuse`` when it
    already is that model's at that length, else a new one (the model is loaded only then)."""
    if (
        reuse is not None
        and reuse.fingerprint == model.fingerprint
        and reuse.max_seq_length == max_seq_length
    ):
        return reuse
    from tasks.core.models import load_sentence_transformer

    return EmbeddingCache(
        workspace,
        load_sentence_transformer(model),
        model.fingerprint,
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        spec=CacheSpec(str(workspace), str(model.path), model.fingerprint, max_seq_length, batch_size),
    )


def encode_texts(
    model: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    show_progress: bool = True,
    desc: str = "encoding",
) -> np.ndarray:
    """Unit-length float32 embeddings (so inner product is cosine)."""
    if show_progress:
        log.info("%s %d texts", desc, len(texts))
    embeddings = model.encode(
        list(texts),
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=True,
    )
    return np.ascontiguousarray(embeddings, dtype=np.float32)


# ------------------------------------------------------------ the corpus embeddings stage


def embed_corpus(
    corpus: Corpus,
    cache: Any,
    store: Store,
    *,
    part_size: int = ENCODE_PART_SIZE,
    progress: Callable[[int, int], None] | None = None,
    parts: PartRunner = LOCAL,
) -> StageRef:
    """Embeddings of every document as a stage (doc_id, content_hash, embedding), keyed by model and content.

    Encoding goes through the persistent EmbeddingCache, so a document whose text was encoded
    before by the same model (in this run, an earlier run, or before a crash) is not encoded again.
    With a distributed ``parts`` runner each unfinished part is a job for a worker, which rebuilds
    the cache from ``cache.spec`` (a cache without one, e.g. a catalog encoder's, encodes here).
    """
    # the cache's folder names the model, the length and how it encodes (PyTorch or ONNX)
    settings = {"max_seq_length": cache.max_seq_length, "part_size": part_size, "cache": cache.folder.name}
    key = stage_key("embeddings", settings, inputs=[corpus.key], models=[cache.fingerprint])
    if store.is_complete("embeddings", key):
        return store.ref("embeddings", key)
    writer = store.open("embeddings", key, config=settings, inputs=[corpus.key], models=[cache.fingerprint])
    docs = corpus.docs
    texts = corpus.texts()
    spec = getattr(cache, "spec", None)
    remote = parts.distributed and spec is not None
    if parts.distributed and not remote:
        log.info("embeddings: this encoder cannot be rebuilt on a worker; encoding in the flow's process")
    chunks = list(chunked(range(len(docs)), part_size))
    jobs = [
        EncodePart(
            spec if remote else cache,
            str(writer.path),
            index,
            [docs["doc_id"].iat[p] for p in positions],
            [docs["content_hash"].iat[p] for p in positions],
            [texts[p] for p in positions],
        )
        for index, positions in chunks
        if not writer.has_part(index)
    ]
    progress = resumed_progress(progress, len(chunks) - len(jobs), len(chunks))
    encoded = sum((parts if remote else LOCAL).run("encode corpus", jobs, progress))
    if remote:
        cache.refresh()  # the workers' new vectors, for the stages that encode documents again
    log.info("embeddings: %d documents encoded, %d taken from the cache", encoded, len(docs) - encoded)
    return writer.commit(encoded=encoded, reused=len(docs) - encoded)


@dataclass(frozen=True)
class EncodePart:
    """One part of the embeddings stage: encode its texts (through the cache) and write the part.
    ``encoder`` is the cache itself, or the :class:`tasks.core.parts.CacheSpec` a worker rebuilds it
    from. Returns how many texts it encoded (0 when the part was already written)."""

    encoder: Any
    stage_dir: str
    index: int
    doc_ids: list[str]
    content_hashes: list[str]
    texts: list[str]

    def __call__(self) -> int:
        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return 0
        cache = self.encoder.build() if isinstance(self.encoder, CacheSpec) else self.encoder
        before = cache.encoded
        vectors = cache.embed(self.texts, desc="encoding documents")
        write_parquet_atomic(target, _embedding_table(self.doc_ids, self.content_hashes, vectors))
        return cache.encoded - before


def _embedding_table(doc_ids: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"doc_id": list(doc_ids), "content_hash": list(hashes), "embedding": column})


def load_embeddings(store: Store, ref: StageRef) -> tuple[list[str], list[str], np.ndarray]:
    """(doc ids, content hashes, unit embeddings as one float32 matrix) of an embeddings stage."""
    table = store.read(ref.stage, ref.key)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return table.column("doc_id").to_pylist(), table.column("content_hash").to_pylist(), matrix
