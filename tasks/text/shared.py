"""What a Dask worker rebuilds from the shared workspace for the text stages' parts.

A part job that runs on a worker carries names, never the corpus, its embeddings or an index: the
worker reads them from the workspace (which every worker mounts, see ``flows/engine.py``) and keeps
them for its next parts (:func:`tasks.core.parts.built_once`). Each is built from the same stored
data as the flow's own, so a part computed on a worker equals the one computed in the flow.

The cost, said in ``benchmarks/README.md``: each worker process holds its own copy of the corpus
texts, the BM25 index, the embeddings and the FAISS index it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.core.parts import built_once

CORPUS_TEXTS = "corpus-texts"


def corpus_texts_stage(store: Any, corpus: Any) -> str:
    """The corpus's ids and texts (in the corpus's order, as the flow indexes them) as a stage of the
    workspace, for workers; returns its key (written once per corpus content)."""
    import pyarrow as pa

    from tasks.core.store import stage_key

    key = stage_key(CORPUS_TEXTS, inputs=[corpus.key])
    if not store.is_complete(CORPUS_TEXTS, key):
        store.remove(CORPUS_TEXTS, key)  # a crashed earlier attempt: one part only
        table = pa.table({"doc_id": list(corpus.ids), "text": list(corpus.texts())})
        store.write_table(CORPUS_TEXTS, key, table, inputs=[corpus.key])
    return key


@dataclass(frozen=True)
class SharedCorpus:
    """The corpus as a worker reads it: the corpus-texts stage ``key`` of ``workspace``."""

    workspace: str
    key: str

    def _column(self, name: str) -> list[str]:
        from tasks.core.store import Store

        def read() -> list[str]:
            return Store(self.workspace).read(CORPUS_TEXTS, self.key, columns=[name]).column(name).to_pylist()

        return built_once(("corpus", self, name), read)

    def ids(self) -> list[str]:
        return self._column("doc_id")

    def texts(self) -> list[str]:
        return self._column("text")

    def text_of(self) -> dict[str, str]:
        return built_once(("corpus-text-of", self), lambda: dict(zip(self.ids(), self.texts(), strict=True)))

    def bm25(self) -> Any:
        """The BM25 index of the texts (the same statistics as the flow's, built from the same texts)."""
        from tasks.core.bm25 import BM25Index

        return built_once(("corpus-bm25", self), lambda: BM25Index(self.texts()))


@dataclass(frozen=True)
class SharedEmbeddings:
    """A corpus embeddings stage as a worker reads it, and the FAISS index over it."""

    workspace: str
    key: str

    def load(self) -> tuple[list[str], Any]:
        """(doc ids, unit vectors) of the stage."""
        from tasks.core.embeddings import load_embeddings
        from tasks.core.store import Store

        def read() -> tuple[list[str], Any]:
            store = Store(self.workspace)
            doc_ids, _, vectors = load_embeddings(store, store.ref("embeddings", self.key))
            return doc_ids, vectors

        return built_once(("embeddings", self), read)

    def index(self, config: Any) -> Any:
        """The FAISS index :func:`tasks.core.index.ann_index` builds for ``config`` (a MineConfig)."""
        from tasks.core.index import ann_index

        settings = config.model_dump_json()  # the index settings and the search depth HNSW is tuned to
        return built_once(("ann-index", self, settings), lambda: ann_index(self.load()[1], config))
