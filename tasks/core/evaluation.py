"""Retrieval evaluation: dense (exact FAISS search) and BM25 runs, scored by ir-measures.

The metric set is the one hosted fine-tuning services report. Per-query values are kept so two
systems can be compared query by query. A report prints as a terminal table and saves as JSON;
:func:`tasks.core.report.publish_markdown` publishes it as a Prefect artifact inside a run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.bm25 import bm25_search
from tasks.core.corpus import BeirData, Corpus
from tasks.core.embeddings import encode_texts
from tasks.core.index import Qrels, Run, exact_index, search_index
from tasks.core.markdown import md

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
        doc_embeddings = encode_texts(
            model, corpus.texts(), batch_size=batch_size, show_progress=show_progress, desc="encoding corpus"
        )
    query_embeddings = encode_texts(
        model,
        queries["text"].tolist(),
        batch_size=batch_size,
        show_progress=show_progress,
        desc="encoding queries",
    )
    index = exact_index(doc_embeddings)
    return search_index(
        index, corpus.ids, queries["query_id"].tolist(), query_embeddings, top_k=top_k, exclude=exclude
    )


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
    return {
        name: float(np.mean(list(values.values()))) if values else 0.0 for name, values in per_query.items()
    }


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
        from tasks.core.store import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


def report_from_run(
    system: str, data: BeirData, run: Run, *, seconds: float = 0.0, notes: str = ""
) -> EvalReport:
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
    exclude: Mapping[str, set[str]] | None = None,
) -> EvalReport:
    """Dense retrieval metrics of a sentence-transformers model (by name, or already loaded);
    ``exclude[query_id]``: documents never counted as retrieved for that query."""
    from tasks.core.models import load_sentence_transformer

    start = time.time()
    encoder = model or load_sentence_transformer(model_name, max_seq_length=max_seq_length)
    if model is not None and max_seq_length:
        encoder.max_seq_length = max_seq_length
    run = dense_search(
        encoder,
        data.corpus,
        data.queries,
        top_k=top_k,
        batch_size=batch_size,
        show_progress=show_progress,
        exclude=exclude,
    )
    return report_from_run(model_name, data, run, seconds=time.time() - start)


def heldout_eval_set(corpus: Corpus, heldout: pd.DataFrame) -> BeirData:
    """An evaluation set of held-out generated queries: each one's relevant document is its source."""
    qrels = {q: {d: 1} for q, d in zip(heldout["query_id"], heldout["doc_id"], strict=True)}
    return BeirData(
        corpus, heldout[["query_id", "text"]].reset_index(drop=True), qrels, "held-out", "generated"
    )


def evaluate_cached(
    query_cache: Any,
    data: BeirData,
    system: str,
    *,
    doc_cache: Any = None,
    top_k: int = 100,
    progress: Any = None,
    exclude: Mapping[str, set[str]] | None = None,
) -> EvalReport:
    """Dense retrieval metrics from embedding caches (``embed(texts)``): queries through ``query_cache``,
    documents through ``doc_cache`` (default: the same model), so nothing cached is encoded again;
    ``progress(done, total)`` follows the encoding of the corpus; ``exclude[query_id]`` are documents
    never counted as retrieved for that query (see :func:`identical_ids`)."""
    start = time.time()
    doc_vectors = (doc_cache or query_cache).embed(
        data.corpus.texts(), desc="encoding corpus for evaluation", progress=progress
    )
    query_vectors = query_cache.embed(data.queries["text"].tolist(), desc="encoding evaluation queries")
    run = search_index(
        exact_index(doc_vectors),
        data.corpus.ids,
        data.queries["query_id"].tolist(),
        query_vectors,
        top_k=top_k,
        exclude=exclude,
    )
    return report_from_run(system, data, run, seconds=time.time() - start)


def evaluate_hybrid(
    query_cache: Any,
    doc_cache: Any,
    data: BeirData,
    bm25: Any,
    weight: float,
    system: str,
    *,
    pool: int = 100,
    top_k: int = 100,
    exclude: Mapping[str, set[str]] | None = None,
) -> EvalReport:
    """Hybrid (dense + BM25, :mod:`tasks.core.hybrid`) retrieval metrics; ``bm25`` indexes
    ``data.corpus`` in its order."""
    from tasks.core.hybrid import hybrid_run

    start = time.time()
    texts = data.queries["text"].tolist()
    run = hybrid_run(
        query_cache.embed(texts, desc="encoding evaluation queries"),
        texts,
        data.queries["query_id"].tolist(),
        doc_cache.embed(data.corpus.texts(), desc="encoding corpus for evaluation"),
        data.corpus.ids,
        bm25,
        weight,
        pool=pool,
        top_k=top_k,
        exclude=exclude,
    )
    return report_from_run(system, data, run, seconds=time.time() - start)


def identical_ids(data: BeirData) -> dict[str, set[str]]:
    """Queries whose id is also a document id, each mapped to itself: such a document is never
    counted as retrieved for its query (BEIR's ``ignore_identical_ids``; ArguAna's queries are
    arguments of its own corpus, and without this each would find itself first)."""
    ids = set(data.corpus.ids)
    return {q: {q} for q in data.queries["query_id"] if q in ids}


def evaluate_bm25(
    data: BeirData,
    *,
    top_k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
    exclude: Mapping[str, set[str]] | None = None,
) -> EvalReport:
    start = time.time()
    run = bm25_search(data.corpus, data.queries, top_k=top_k, k1=k1, b=b, exclude=exclude)
    return report_from_run(f"BM25 (k1={k1}, b={b})", data, run, seconds=time.time() - start)


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
        lines.append(f"| {md(report.system)} | {values} | {report.seconds:.1f} |")
    return "\n".join(lines)


def rich_table(
    reports: Sequence[EvalReport], title: str = "Retrieval evaluation", metrics: Sequence[str] | None = None
):
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


def save_reports(reports: Sequence[EvalReport], path: str | Path) -> Path:
    from tasks.core.store import write_json_atomic

    path = Path(path)
    write_json_atomic(path, {"reports": [r.to_dict() for r in reports]})
    return path


def load_reports(path: str | Path) -> list[EvalReport]:
    return [EvalReport.from_dict(r) for r in json.loads(Path(path).read_text())["reports"]]


def evaluate_modes(
    watch: Any, data: BeirData, bm25: Any, exclude: Any, *, pool: int, before: Any, after: Any, progress: Any
) -> dict[str, tuple[Any, Any]]:
    """Dense and hybrid reports before and after: {"dense": (before, after), "hybrid": (before, after)};
    ``before``/``after`` are (query cache, document cache, BM25 weight, system name); ``watch`` a
    :class:`tasks.core.timing.Stopwatch` that times each, ``progress(label)`` a progress callback."""
    reports: dict[str, list[Any]] = {"dense": [], "hybrid": []}
    for when, (queries, docs, weight, system) in (("before", before), ("after", after)):
        reports["dense"].append(
            watch.run(
                f"evaluate {when}",
                len(data.queries),
                evaluate_cached,
                queries,
                data,
                system,
                doc_cache=docs,
                exclude=exclude,
                progress=progress(f"evaluation {when}: encoding the corpus"),
            )
        )
        reports["hybrid"].append(
            watch.run(
                f"evaluate {when} (hybrid)",
                len(data.queries),
                evaluate_hybrid,
                queries,
                docs,
                data,
                bm25,
                weight,
                f"{system} + BM25 (weight {weight:g})",
                pool=pool,
                exclude=exclude,
            )
        )
    return {mode: (pair[0], pair[1]) for mode, pair in reports.items()}


def served_mode(evaluation: Mapping[str, tuple[Any, Any]], setting: str) -> str:
    """The mode a new version serves (and the gate compares): ``setting`` (dense or hybrid), or for
    auto whichever of the two ``evaluate_modes`` reports measured better after training."""
    if setting != "auto":
        return setting
    return "hybrid" if evaluation["hybrid"][1].primary > evaluation["dense"][1].primary else "dense"
