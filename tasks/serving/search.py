"""Search with the current model: a FAISS index of the corpus saved next to the model version.

``<workspace>/models/<name>/<version>/index/`` holds ``index.faiss`` (exact inner product over unit
vectors), ``docs.parquet`` (doc_id, title, snippet in index order) and ``meta.json`` (the corpus it
was built from and its content key); see :mod:`tasks.core.index`. Each version has its own index,
so when ``current`` changes the next search builds (once) and uses the new version's index; an
index whose corpus has changed since is rebuilt too.

A version's card says what it serves (``serving``: ``mode`` dense or hybrid, the hybrid's
``bm25_weight`` and ``pool``, as `adapt text` measured and recorded them). Hybrid search fuses the
dense scores with BM25 over the same corpus (:mod:`tasks.core.hybrid`); BM25 is built from the corpus
when the searcher starts, so hybrid search needs the corpus to be readable.

Python API::

    searcher = Searcher("adapt-workspace", "text-retriever")
    searcher.encode(["a query"])            # unit vectors from the current model
    searcher.search("a query", k=10)        # [Hit(doc_id, score, title, snippet), ...] in the card's mode
    searcher.search("a query", mode="dense")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.core.defaults import CATALOG_CLIP_MODEL_NAME, DEFAULT_BM25_WEIGHT, TEXT_MODEL_NAME
from tasks.core.index import IMAGE_INDEX_DIR, INDEX_DIR, index_corpus, load_index, save_index
from tasks.core.registry import Registry, RegistryError

log = logging.getLogger(__name__)

SEARCH_MODES = ("dense", "hybrid")


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    title: str
    snippet: str


def corpus_of(card: dict[str, Any]) -> str | None:
    """The corpus a registered version was trained on, from its card (None if not recorded)."""
    config = card.get("config") or {}
    return card.get("corpus") or config.get("corpus") or config.get("catalog")


class Searcher:
    """The current version of a registered model with its corpus index."""

    def __init__(
        self,
        workspace: str | Path,
        name: str = TEXT_MODEL_NAME,
        *,
        corpus: str | Path | None = None,
        version: str | None = None,
        mode: str | None = None,
    ):
        """``mode``: dense or hybrid (none: what the version's card says it serves, else dense)."""
        from tasks.core.models import load_sentence_transformer

        self.registry = Registry(workspace)
        self.name = name
        self.version = version or self.registry.current(name)
        if self.version is None:
            known = self.registry.names()
            raise RegistryError(
                f"model '{name}' has no current version to search with"
                + (
                    f" (registered models: {', '.join(known)})"
                    if known
                    else f" (no model registered in {Path(workspace) / 'models'}; run `adapt text` first)"
                )
            )
        self.model_dir = self.registry.path(name, self.version)
        self.card = self.registry.card(name, self.version)
        self.model = load_sentence_transformer(str(self.model_dir))
        # a query-side refresh keeps the document side of an earlier version: documents go through that one
        documents = self.registry.document_model(name, self.version)
        self.document_model = (
            self.model if documents == str(self.model_dir) else load_sentence_transformer(documents)
        )
        self.index_dir = self.model_dir / INDEX_DIR
        self.serving = dict(self.card.get("serving") or {})
        self.mode = mode or self.serving.get("mode", "dense")
        if self.mode not in SEARCH_MODES:
            raise ValueError(f"search mode must be one of {', '.join(SEARCH_MODES)}, not {self.mode!r}")
        self._corpus: Any = None
        self._bm25: Any = None
        self._load(corpus)

    def _load(self, corpus_path: str | Path | None) -> None:
        from tasks.core.products import read_products

        meta_file = self.index_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        source = corpus_path or (meta or {}).get("corpus") or corpus_of(self.card)
        if source is None:
            raise RegistryError(
                f"{self.name} {self.version}: no corpus recorded on its card; pass the corpus"
            )
        # The index is kept while its corpus is unchanged; a corpus that is gone keeps the old index.
        corpus = (
            None
            if (meta is not None and not corpus_path and not Path(source).exists())
            else read_products(source, image_root=(self.card.get("config") or {}).get("image_root"))
        )
        if meta is None or (corpus is not None and corpus.key != meta["corpus_key"]):
            log.info("building the search index of %s %s over %s", self.name, self.version, source)
            index_corpus(self.document_model, corpus, self.index_dir)
        self.index, self.docs, self.meta = load_index(self.index_dir)
        self._corpus, self._source = corpus, source

    @property
    def bm25_weight(self) -> float:
        return float(self.serving.get("bm25_weight", DEFAULT_BM25_WEIGHT))

    def _lexical(self) -> Any:
        """BM25 over the indexed corpus, in index order (built on first hybrid search)."""
        from tasks.core.bm25 import BM25Index

        if self._bm25 is None:
            if self._corpus is None:
                raise RegistryError(
                    f"hybrid search needs the corpus for BM25, and {self._source} is not there; "
                    "pass the corpus, or search with mode dense"
                )
            texts = dict(zip(self._corpus.ids, self._corpus.texts(), strict=True))
            self._bm25 = BM25Index([texts[d["doc_id"]] for d in self.docs])
            self._vectors = self.index.reconstruct_n(0, self.index.ntotal)
        return self._bm25

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length query embeddings under the current model."""
        from tasks.core.embeddings import encode_texts

        self.model.max_seq_length = self.meta.get("max_seq_length", 256)
        return encode_texts(self.model, list(texts), batch_size=64, show_progress=False)

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length document embeddings, as the index holds them (the same model unless the version
        adapted only its query side)."""
        from tasks.core.embeddings import encode_texts

        self.document_model.max_seq_length = self.meta.get("max_seq_length", 256)
        return encode_texts(self.document_model, list(texts), batch_size=64, show_progress=False)

    def search(self, query: str, k: int = 10, *, mode: str | None = None) -> list[Hit]:
        """The k best documents for the query, best first: by cosine (dense) or by the fused score
        (hybrid); ``mode`` defaults to the searcher's."""
        if not query.strip():
            raise ValueError("the query is empty")
        mode = mode or self.mode
        if mode not in SEARCH_MODES:
            raise ValueError(f"search mode must be one of {', '.join(SEARCH_MODES)}, not {mode!r}")
        k = min(k, self.index.ntotal)
        vector = self.encode([query])
        if mode == "dense":
            scores, positions = self.index.search(vector, k)
            pairs = [(float(s), int(p)) for s, p in zip(scores[0], positions[0], strict=True) if p >= 0]
        else:
            from tasks.core.hybrid import hybrid_rows

            bm25 = self._lexical()
            dense = vector @ self._vectors.T
            lexical = bm25.score_rows([query])
            row = hybrid_rows(dense, lexical, self.bm25_weight, int(self.serving.get("pool", 100)))[0]
            best = np.argpartition(-row, k - 1)[:k]
            pairs = [(float(row[p]), int(p)) for p in best[np.argsort(-row[best])]]
        return [
            Hit(self.docs[p]["doc_id"], s, self.docs[p]["title"], self.docs[p]["snippet"]) for s, p in pairs
        ]


class ImageSearcher:
    """Text queries against the catalog's product images, with the current image/text model.

    The model is a catalog encoder from `adapt clip` (registered as ``catalog-clip`` by default):
    its image index (``<version>/image-index/``) holds every product image of the catalog recorded
    on its card, built on first use and rebuilt when the catalog changes.
    """

    def __init__(
        self,
        workspace: str | Path,
        name: str = CATALOG_CLIP_MODEL_NAME,
        *,
        catalog: str | Path | None = None,
        version: str | None = None,
        batch_size: int = 256,
    ):
        from tasks.catalog.encoders import load_catalog_encoder

        self.registry = Registry(workspace)
        self.name = name
        self.version = version or self.registry.current(name)
        if self.version is None:
            raise RegistryError(
                f"model '{name}' has no current version to search images with "
                "(run `adapt clip --catalog ...` first)"
            )
        self.model_dir = self.registry.path(name, self.version)
        self.card = self.registry.card(name, self.version)
        self.encoder = load_catalog_encoder(self.model_dir)
        self.index_dir = self.model_dir / IMAGE_INDEX_DIR
        self.batch_size = batch_size
        self._load(catalog or self.card.get("data") or corpus_of(self.card))

    def _load(self, source: str | Path | None) -> None:
        from tasks.core.products import read_catalog

        meta_file = self.index_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        if source is None and meta is None:
            raise RegistryError(
                f"{self.name} {self.version}: no catalog recorded on its card; pass the catalog"
            )
        catalog = (
            read_catalog(
                source, image_root=(self.card.get("config") or {}).get("image_root"), missing_image="skip"
            )
            if source and Path(source).exists()
            else None
        )
        if meta is None or (catalog is not None and catalog.key != meta["corpus_key"]):
            if catalog is None:
                raise RegistryError(f"catalog {source} of {self.name} {self.version} is not there to index")
            log.info("building the image index of %s %s over %s", self.name, self.version, source)
            self._build(catalog)
        self.index, self.docs, _ = load_index(self.index_dir)

    def _build(self, catalog: Any) -> None:
        vectors = []
        images = catalog.docs["image"].tolist()
        for start in range(0, len(images), 1024):  # decode a slice at a time: bounded memory
            vectors.append(
                self.encoder.encode_images(images[start : start + 1024], batch_size=self.batch_size)
            )
        docs = catalog.docs
        save_index(
            self.index_dir,
            np.concatenate(vectors),
            pa.table(
                {
                    "doc_id": docs["doc_id"].tolist(),
                    "title": docs["title"].fillna("").tolist(),
                    "image": docs["image"].tolist(),
                }
            ),
            {"corpus": str(catalog.source), "corpus_key": catalog.key, "images": len(docs)},
        )

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The k product images closest to the text query, best first (``snippet`` is the image path)."""
        if not query.strip():
            raise ValueError("the query is empty")
        vector = np.ascontiguousarray(self.encoder.encode_text([query]), dtype=np.float32)
        scores, positions = self.index.search(vector, min(k, self.index.ntotal))
        return [
            Hit(self.docs[p]["doc_id"], float(s), self.docs[p]["title"], self.docs[p]["image"])
            for s, p in zip(scores[0], positions[0], strict=True)
            if p >= 0
        ]
