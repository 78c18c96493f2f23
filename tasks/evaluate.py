"""Retrieval evaluation: dense (exact FAISS search) and BM25 runs, scored by ir-measures.

The metric set is the one hosted fine-tuning services report. Per-query values are kept so two
systems can be compared query by query. A report prints as a terminal table, saves as JSON and,
inside a Prefect run, is published as a markdown artifact.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.corpus import BeirData, Corpus

log = logging.getLogger(__name__)

# Display name -> ir-measures measure. The runs hold the top 100, so MAP is AP over those 100.
MEASURES: dict[str, str] = {
    "nDCG@10": "nDCG@10",
    "MRR@10": "RR@10",
    "MAP@100": "AP@100",
    "Recall@10": "R@10",
    "Recall@100": "R@100",
    "P@10": "P@10",
    "Hit@10": "Success@10",
    "R-Precision": "Rprec",
}
PRIMARY_METRIC = "nDCG@10"

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


# ------------------------------------------------------------------------------------- searching


def encode_texts(
    model: Any, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = True, desc: str = "encoding"
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


def exact_index(embeddings: np.ndarray):
    """Exact inner-product FAISS index over unit vectors."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def search_index(
    index: Any,
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    query_embeddings: np.ndarray,
    *,
    top_k: int,
    exclude: Mapping[str, set[str]] | None = None,
) -> Run:
    """Top-k per query as a run; ``exclude`` drops given docs for a query (e.g. the query itself)."""
    extra = max((len(v) for v in exclude.values()), default=0) if exclude else 0
    depth = min(top_k + extra, index.ntotal)
    scores, positions = index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32), depth)
    run: Run = {}
    for row, query_id in enumerate(query_ids):
        skip = exclude.get(query_id, set()) if exclude else set()
        hits: dict[str, float] = {}
        for score, pos in zip(scores[row], positions[row], strict=True):
            if pos < 0:
                continue
            doc_id = doc_ids[pos]
            if doc_id in skip:
                continue
            hits[doc_id] = float(score)
            if len(hits) == top_k:
                break
        run[query_id] = hits
    return run


def dense_search(
    model: Any,
    corpus: Corpus,
    queries: pd.DataFrame,
    *,
    top_k: int = 100,
    batch_size: int = 64,
    exclude: Mapping[str, set[str]] | None = None,
    doc_embeddings: np.ndarray | None = None,
    show_progress: bool = True,
) -> Run:
    """Exact cosine search of every query over the corpus."""
    if doc_embeddings is None:
        doc_embeddings = encode_texts(model, corpus.texts(), batch_size=batch_size, show_progress=show_progress,
                                      desc="encoding corpus")
    query_embeddings = encode_texts(model, queries["text"].tolist(), batch_size=batch_size,
                                    show_progress=show_progress, desc="encoding queries")
    index = exact_index(doc_embeddings)
    return search_index(index, corpus.ids, queries["query_id"].tolist(), query_embeddings, top_k=top_k, exclude=exclude)


class BM25Index:
    """A bm25s index over a corpus (Lucene BM25, stemmed, English stop words removed)."""

    def __init__(self, texts: Sequence[str], *, k1: float = 0.9, b: float = 0.4, show_progress: bool = False):
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        self.k1, self.b = k1, b
        self.tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english").stemWord)
        tokens = self.tokenizer.tokenize(list(texts), update_vocab=True, return_as="ids", show_progress=show_progress)
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=show_progress)
        self.size = len(texts)
        # Corpus statistics for scoring texts that are not in the index (see score_pairs).
        vocab_size = len(self.tokenizer.get_vocab_dict())
        self.doc_freq = np.zeros(vocab_size, dtype=np.int64)
        for ids in tokens.ids if hasattr(tokens, "ids") else tokens:
            self.doc_freq[np.unique(np.asarray(ids, dtype=np.int64))] += 1
        lengths = [len(ids) for ids in (tokens.ids if hasattr(tokens, "ids") else tokens)]
        self.avg_length = float(np.mean(lengths)) if lengths else 1.0

    def query_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.tokenize(list(texts), update_vocab=False, return_as="ids", show_progress=False)

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores), each (len(texts), k); queries with no known word score 0 everywhere."""
        ids = self.query_ids(texts)
        k = min(k, self.size)
        positions, scores = self.retriever.retrieve(ids, k=k, show_progress=False, n_threads=1)
        return np.asarray(positions), np.asarray(scores, dtype=np.float32)

    def all_scores(self, query_ids: Sequence[int]) -> np.ndarray:
        """BM25 score of one (tokenized) query against every indexed document."""
        if not query_ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(list(query_ids)), dtype=np.float32)

    def score_pairs(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """BM25 of (query, text) pairs under this corpus's statistics, for texts that need not be indexed.

        Written by hand because bm25s scores only the documents it indexed; a teacher must also score
        passages made for training (a document with its inverse-cloze sentence removed). Same Lucene
        formula and tokenizer as bm25s, so an indexed document gets the same score either way.
        """
        query_ids = self.query_ids(queries)
        text_tokens = self.tokenizer.tokenize(list(texts), update_vocab=False, return_as="string", show_progress=False)
        vocab = self.tokenizer.get_vocab_dict()
        scores = np.zeros(len(queries), dtype=np.float32)
        for row, (q_ids, tokens) in enumerate(zip(query_ids, text_tokens, strict=True)):
            if not q_ids:
                continue
            counts: dict[int, int] = {}
            for token in tokens:
                token_id = vocab.get(token)
                if token_id is not None:
                    counts[token_id] = counts.get(token_id, 0) + 1
            norm = self.k1 * ((1 - self.b) + self.b * len(tokens) / self.avg_length)
            total = 0.0
            for token_id in q_ids:
                tf = counts.get(token_id, 0)
                if tf:
                    df = self.doc_freq[token_id]
                    idf = math.log(1 + (self.size - df + 0.5) / (df + 0.5))
                    total += idf * tf / (norm + tf)
            scores[row] = total
        return scores


def bm25_search(
    corpus: Corpus,
    queries: pd.DataFrame,
    *,
    top_k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
    exclude: Mapping[str, set[str]] | None = None,
) -> Run:
    """BM25 run over the corpus (title + text)."""
    index = BM25Index(corpus.texts(), k1=k1, b=b)
    extra = max((len(v) for v in exclude.values()), default=0) if exclude else 0
    positions, scores = index.search(queries["text"].tolist(), top_k + extra)
    ids = corpus.ids
    run: Run = {}
    for row, query_id in enumerate(queries["query_id"]):
        skip = exclude.get(query_id, set()) if exclude else set()
        hits = {ids[p]: float(s) for p, s in zip(positions[row], scores[row], strict=True) if s > 0 and ids[p] not in skip}
        run[query_id] = dict(list(hits.items())[:top_k])
    return run


# --------------------------------------------------------------------------------------- scoring


def score_run(qrels: Qrels, run: Run, measures: Mapping[str, str] = MEASURES) -> dict[str, dict[str, float]]:
    """Per-query values {metric: {query_id: value}} for every judged query (unanswered ones score 0)."""
    import ir_measures

    parsed = {name: ir_measures.parse_measure(spec) for name, spec in measures.items()}
    by_measure = {str(m): name for name, m in parsed.items()}
    judged = [q for q, docs in qrels.items() if any(g > 0 for g in docs.values())]
    per_query: dict[str, dict[str, float]] = {name: dict.fromkeys(judged, 0.0) for name in measures}
    qrels_in = {q: {d: int(g) for d, g in qrels[q].items()} for q in judged}
    run_in = {q: docs for q, docs in run.items() if q in qrels_in and docs}
    if run_in:
        for metric in ir_measures.iter_calc(list(parsed.values()), qrels_in, run_in):
            per_query[by_measure[str(metric.measure)]][metric.query_id] = float(metric.value)
    return per_query


def aggregate(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over queries of each metric (the standard aggregation of every metric here)."""
    return {name: float(np.mean(list(values.values()))) if values else 0.0 for name, values in per_query.items()}


@dataclass
class EvalReport:
    """Metrics of one system on one evaluation set, with per-query values and top hits."""

    system: str
    dataset: str
    n_queries: int
    n_docs: int
    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    top_hits: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: str = ""

    @property
    def primary(self) -> float:
        return self.metrics[PRIMARY_METRIC]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        from tasks.store import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


def report_from_run(system: str, data: BeirData, run: Run, *, seconds: float = 0.0, notes: str = "") -> EvalReport:
    per_query = score_run(data.qrels, run)
    top_hits = {q: sorted(hits, key=hits.get, reverse=True)[:10] for q, hits in run.items()}
    return EvalReport(
        system=system,
        dataset=f"{data.folder} [{data.split}]",
        n_queries=len(next(iter(per_query.values()))),
        n_docs=len(data.corpus),
        metrics=aggregate(per_query),
        per_query=per_query,
        top_hits=top_hits,
        seconds=round(seconds, 2),
        notes=notes,
    )


def evaluate_model(
    model_name: str,
    data: BeirData,
    *,
    top_k: int = 100,
    batch_size: int = 64,
    max_seq_length: int | None = 256,
    show_progress: bool = True,
    model: Any = None,
) -> EvalReport:
    """Dense retrieval metrics of a sentence-transformers model (by name, or already loaded)."""
    from tasks.models import load_sentence_transformer

    start = time.time()
    encoder = model or load_sentence_transformer(model_name, max_seq_length=max_seq_length)
    if model is not None and max_seq_length:
        encoder.max_seq_length = max_seq_length
    run = dense_search(encoder, data.corpus, data.queries, top_k=top_k, batch_size=batch_size,
                       show_progress=show_progress)
    return report_from_run(model_name, data, run, seconds=time.time() - start)


def evaluate_bm25(data: BeirData, *, top_k: int = 100, k1: float = 0.9, b: float = 0.4) -> EvalReport:
    start = time.time()
    run = bm25_search(data.corpus, data.queries, top_k=top_k, k1=k1, b=b)
    return report_from_run(f"BM25 (k1={k1}, b={b})", data, run, seconds=time.time() - start)


# -------------------------------------------------------------------------------------- reporting


def compare_per_query(before: EvalReport, after: EvalReport, metric: str = PRIMARY_METRIC) -> dict[str, Any]:
    """Query-by-query comparison: how many queries got better, worse, or stayed the same."""
    b, a = before.per_query[metric], after.per_query[metric]
    shared = sorted(set(b) & set(a))
    deltas = {q: a[q] - b[q] for q in shared}
    return {
        "metric": metric,
        "queries": len(shared),
        "improved": sum(d > 1e-9 for d in deltas.values()),
        "worsened": sum(d < -1e-9 for d in deltas.values()),
        "unchanged": sum(abs(d) <= 1e-9 for d in deltas.values()),
        "mean_delta": float(np.mean(list(deltas.values()))) if deltas else 0.0,
        "deltas": deltas,
    }


def markdown_table(reports: Sequence[EvalReport], metrics: Sequence[str] | None = None) -> str:
    metrics = list(metrics or MEASURES)
    lines = ["| system | " + " | ".join(metrics) + " | seconds |", "|---|" + "---:|" * (len(metrics) + 1)]
    for report in reports:
        values = " | ".join(f"{report.metrics[m]:.4f}" for m in metrics)
        lines.append(f"| {report.system} | {values} | {report.seconds:.1f} |")
    return "\n".join(lines)


def rich_table(reports: Sequence[EvalReport], title: str = "Retrieval evaluation", metrics: Sequence[str] | None = None):
    """Metrics as rows, systems as columns (fits a terminal however many metrics there are)."""
    from rich.table import Table

    metrics = list(metrics or MEASURES)
    table = Table(title=title)
    table.add_column("metric", style="bold")
    for report in reports:
        table.add_column(report.system, justify="right", overflow="fold")
    for metric in metrics:
        values = [r.metrics[metric] for r in reports]
        best = max(values)
        cells = [f"[green]{v:.4f}[/green]" if len(reports) > 1 and v == best else f"{v:.4f}" for v in values]
        table.add_row(metric, *cells)
    table.add_row("seconds", *[f"{r.seconds:.1f}" for r in reports])
    return table


def publish_markdown(markdown: str, key: str, description: str) -> bool:
    """A Prefect markdown artifact when running inside a flow or task run; a no-op elsewhere."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=key, description=description)
    return True


def save_reports(reports: Sequence[EvalReport], path: str | Path) -> Path:
    from tasks.store import write_json_atomic

    path = Path(path)
    write_json_atomic(path, {"reports": [r.to_dict() for r in reports]})
    return path


def load_reports(path: str | Path) -> list[EvalReport]:
    return [EvalReport.from_dict(r) for r in json.loads(Path(path).read_text())["reports"]]


# --------------------------------------------------------------------- image/text (catalog) evaluation
#
# A catalog has no queries or judgments; they are built from its own fields, on products held out
# of training: each product's caption must find its image (caption -> image), attribute queries
# built from field combinations ("{gender} {baseColour} {articleType}") must find every product
# with those values (attribute -> image), and each image must find other images of its kind
# (image -> image, by articleType). Runs are exact FAISS searches, scored by ir-measures.

CAPTION_MEASURES: dict[str, str] = {"Recall@1": "R@1", "Recall@5": "R@5", "Recall@10": "R@10", "MRR": "RR@100"}
ATTRIBUTE_MEASURES: dict[str, str] = {"nDCG@10": "nDCG@10", "P@10": "P@10", "Recall@100": "R@100"}
IMAGE_MEASURES: dict[str, str] = {"P@10": "P@10", "nDCG@10": "nDCG@10"}
DEFAULT_ATTRIBUTE_QUERIES = ("{gender} {baseColour} {articleType}",)
CATALOG_PRIMARY_METRIC = "attribute_ndcg@10"


@dataclass
class CatalogEvalSet:
    """Held-out products (the gallery) with queries and judgments built from their fields."""

    doc_ids: list[str]
    pixels: np.ndarray  # uint8 (N, height, width, 3), row i is doc_ids[i]
    captions: list[str]
    caption_qrels: dict[str, dict[str, int]]  # query id = product id: its caption finds its image
    attribute_queries: dict[str, str]
    attribute_qrels: dict[str, dict[str, int]]
    image_qrels: dict[str, dict[str, int]]  # query id = product id: other products of its group
    group_field: str
    source: str = ""


def catalog_eval_set(
    pairs: Any,
    *,
    attribute_templates: Sequence[str] = DEFAULT_ATTRIBUTE_QUERIES,
    group_field: str = "articleType",
) -> CatalogEvalSet:
    """Queries and judgments from held-out pairs (a :class:`tasks.pairs.Pairs`).

    Attribute queries: every distinct filling of each template by a product whose fields it uses
    are all non-empty; every product with the same values is relevant. Image queries: each product
    whose group (articleType) has another product; the others of its group are relevant.
    """
    from tasks.pairs import render_caption, template_fields

    ids = [str(i) for i in pairs.ids]
    attributes = pairs.attributes()
    if attributes and group_field not in attributes[0]:
        raise ValueError(f"group field '{group_field}' is not a catalog field; fields: {sorted(attributes[0])}")
    attribute_queries: dict[str, str] = {}
    attribute_qrels: dict[str, dict[str, int]] = {}
    by_text: dict[str, str] = {}
    for template in attribute_templates:
        fields = template_fields(template)
        missing = [f for f in fields if attributes and f not in attributes[0]]
        if missing:
            raise ValueError(f"attribute query {template!r} names field(s) {missing} that are not catalog fields; "
                             f"fields: {sorted(attributes[0])}")
        groups: dict[tuple[str, ...], list[str]] = {}
        for doc_id, values in zip(ids, attributes, strict=True):
            combo = tuple((values.get(f) or "").strip() for f in fields)
            if all(combo):
                groups.setdefault(combo, []).append(doc_id)
        for combo, members in sorted(groups.items()):
            text = render_caption(template, dict(zip(fields, combo, strict=True)))
            query_id = by_text.get(text.lower())
            if query_id is None:
                query_id = f"attr-{len(attribute_queries) + 1:05d}"
                by_text[text.lower()] = query_id
                attribute_queries[query_id] = text
            attribute_qrels.setdefault(query_id, {}).update(dict.fromkeys(members, 1))
    members_of: dict[str, list[str]] = {}
    for doc_id, values in zip(ids, attributes, strict=True):
        group = (values.get(group_field) or "").strip()
        if group:
            members_of.setdefault(group, []).append(doc_id)
    image_qrels = {}
    for doc_id, values in zip(ids, attributes, strict=True):
        others = [d for d in members_of.get((values.get(group_field) or "").strip(), []) if d != doc_id]
        if others:
            image_qrels[doc_id] = dict.fromkeys(others, 1)
    return CatalogEvalSet(
        doc_ids=ids, pixels=pairs.pixels, captions=list(pairs.captions),
        caption_qrels={d: {d: 1} for d in ids}, attribute_queries=attribute_queries,
        attribute_qrels=attribute_qrels, image_qrels=image_qrels, group_field=group_field,
        source=str(getattr(pairs, "source", "")),
    )


@dataclass
class CatalogReport:
    """Caption -> image, attribute -> image and image -> image results of one encoder."""

    system: str
    n_products: int
    caption: EvalReport
    attribute: EvalReport
    image: EvalReport
    seconds: float = 0.0
    notes: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        """Flat metric names: caption_recall@10, attribute_ndcg@10, image_precision@10, ..."""
        flat = {}
        for task_name, report in (("caption", self.caption), ("attribute", self.attribute), ("image", self.image)):
            for name, value in report.metrics.items():
                flat[f"{task_name}_{_flat_metric_name(name)}"] = value
        return flat

    @property
    def primary(self) -> float:
        return self.metrics[CATALOG_PRIMARY_METRIC]

    def to_dict(self) -> dict[str, Any]:
        return {"system": self.system, "n_products": self.n_products, "metrics": self.metrics,
                "seconds": self.seconds, "notes": self.notes, "caption": self.caption.to_dict(),
                "attribute": self.attribute.to_dict(), "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogReport:
        return cls(system=data["system"], n_products=data["n_products"],
                   caption=EvalReport.from_dict(data["caption"]), attribute=EvalReport.from_dict(data["attribute"]),
                   image=EvalReport.from_dict(data["image"]), seconds=data.get("seconds", 0.0),
                   notes=data.get("notes", ""))

    def save(self, path: str | Path) -> Path:
        from tasks.store import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


def _flat_metric_name(name: str) -> str:
    return {"Recall": "recall", "MRR": "mrr", "nDCG": "ndcg", "P": "precision"}.get(
        name.split("@")[0], name.lower()) + (f"@{name.split('@')[1]}" if "@" in name else "")


def _scored(system: str, dataset: str, qrels: Qrels, run: Run, measures: Mapping[str, str], n_docs: int,
            seconds: float) -> EvalReport:
    per_query = score_run(qrels, run, measures)
    return EvalReport(system=system, dataset=dataset, n_queries=len(qrels), n_docs=n_docs,
                      metrics=aggregate(per_query), per_query=per_query,
                      top_hits={q: sorted(h, key=h.get, reverse=True)[:10] for q, h in run.items()},
                      seconds=round(seconds, 2))


def evaluate_catalog_encoder(
    encoder: Any,
    eval_set: CatalogEvalSet,
    *,
    system: str,
    top_k: int = 100,
    workspace: str | Path | None = None,
    batch_size: int = 128,
    show_progress: bool = True,
    image_embeddings: np.ndarray | None = None,
) -> CatalogReport:
    """Caption -> image (Recall@1/5/10, MRR), attribute -> image (nDCG@10, P@10, Recall@100) and
    image -> image by group (P@10) of an image/text encoder (``encode_text`` / ``encode_images``) on
    held-out products. Text vectors are cached in ``workspace`` (keyed by the text model's
    fingerprint), so a frozen text tower's queries are encoded once for before and after."""
    from tasks.image_text import cached_text_embeddings

    start = time.time()
    dataset = f"{eval_set.source} [held out: {len(eval_set.doc_ids)} products]"
    if image_embeddings is None:
        image_embeddings = encoder.encode_images(eval_set.pixels, show_progress=show_progress)
    index = exact_index(image_embeddings)
    ids = eval_set.doc_ids

    began = time.time()
    caption_vectors = cached_text_embeddings(encoder, eval_set.captions, workspace, batch_size=batch_size,
                                             show_progress=show_progress)
    run = search_index(index, ids, ids, caption_vectors, top_k=top_k)
    caption = _scored(system, dataset, eval_set.caption_qrels, run, CAPTION_MEASURES, len(ids), time.time() - began)

    began = time.time()
    query_ids = list(eval_set.attribute_queries)
    query_vectors = cached_text_embeddings(encoder, [eval_set.attribute_queries[q] for q in query_ids], workspace,
                                           batch_size=batch_size, show_progress=show_progress)
    run = search_index(index, ids, query_ids, query_vectors, top_k=top_k)
    attribute = _scored(system, dataset, eval_set.attribute_qrels, run, ATTRIBUTE_MEASURES, len(ids),
                        time.time() - began)

    began = time.time()
    image_queries = [d for d in ids if d in eval_set.image_qrels]
    position = {d: i for i, d in enumerate(ids)}
    rows = [position[d] for d in image_queries]
    run = search_index(index, ids, image_queries, image_embeddings[rows], top_k=top_k,
                       exclude={d: {d} for d in image_queries})
    image = _scored(system, dataset, eval_set.image_qrels, run, IMAGE_MEASURES, len(ids), time.time() - began)
    return CatalogReport(system=system, n_products=len(ids), caption=caption, attribute=attribute, image=image,
                         seconds=round(time.time() - start, 2))


def catalog_metrics_markdown(reports: Sequence[CatalogReport]) -> str:
    """Metric rows, one column per system, with the change from the first system to the last."""
    names = list(reports[0].metrics)
    header = "| metric | " + " | ".join(r.system for r in reports) + (" | change |" if len(reports) > 1 else " |")
    lines = [header, "|---|" + "---:|" * (len(reports) + (1 if len(reports) > 1 else 0))]
    for name in names:
        values = [r.metrics[name] for r in reports]
        change = f" {values[-1] - values[0]:+.4f} |" if len(reports) > 1 else ""
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |" + change)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- Prefect tasks

from prefect import task  # noqa: E402

evaluate_model_task = task(evaluate_model, name="evaluate-model", task_run_name="evaluate {model_name}")
evaluate_bm25_task = task(evaluate_bm25, name="evaluate-bm25")
