"""Evaluation of a model on labelled data: retrieval and pair classification, from one encoding.

Retrieval metrics are those of :mod:`tasks.core.evaluation`; pair classification gives accuracy,
F1 and average precision of the cosine score at the best threshold, computed with
sentence-transformers' ``BinaryClassificationEvaluator``. :class:`LabelledReport` holds both,
before or after training, with example matches for the report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.embeddings import encode_texts
from tasks.core.evaluation import EvalReport, report_from_run
from tasks.core.index import exact_index, search_index
from tasks.labelled.eval_set import EvalSet, build_eval_set
from tasks.labelled.splits import PreparedData

log = logging.getLogger(__name__)


PAIR_METRICS = ("accuracy", "F1", "AP")


@dataclass
class LabelledReport:
    """Retrieval and pair-classification metrics of one model on one evaluation set."""

    system: str
    retrieval: EvalReport
    classification: dict[str, float]  # accuracy, F1, AP (+ thresholds, precision, recall)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """All headline metrics in one mapping: the retrieval set's, then pair accuracy, F1, AP."""
        return {**self.retrieval.metrics, **{f"pair {m}": self.classification[m] for m in PAIR_METRICS}}

    def metric(self, name: str) -> float:
        metrics = self.metrics
        if name not in metrics:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(metrics)}")
        return metrics[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "retrieval": self.retrieval.to_dict(),
            "classification": self.classification,
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelledReport:
        return cls(
            system=data["system"],
            retrieval=EvalReport.from_dict(data["retrieval"]),
            classification=dict(data["classification"]),
            seconds=data.get("seconds", 0.0),
            extra=dict(data.get("extra", {})),
        )

    def save(self, path: str | Path) -> Path:
        from tasks.core.store import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LabelledReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 and AP of a similarity score at its best thresholds (sentence-transformers'
    BinaryClassificationEvaluator's own threshold search, on scores we already have)."""
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:  # e.g. (query, positive) rows only: nothing to tell apart
        log.warning("pair classification needs duplicate and non-duplicate pairs; reporting NaN")
        nan = float("nan")
        return {
            "accuracy": nan,
            "F1": nan,
            "AP": nan,
            "accuracy_threshold": nan,
            "f1_threshold": nan,
            "precision": nan,
            "recall": nan,
            "pairs": int(len(labels)),
        }
    accuracy, accuracy_threshold = BinaryClassificationEvaluator.find_best_acc_and_threshold(
        scores, labels, True
    )
    f1, precision, recall, f1_threshold = BinaryClassificationEvaluator.find_best_f1_and_threshold(
        scores, labels, True
    )
    return {
        "accuracy": float(accuracy),
        "F1": float(f1),
        "AP": float(average_precision_score(labels, scores)),
        "accuracy_threshold": float(accuracy_threshold),
        "f1_threshold": float(f1_threshold),
        "precision": float(precision),
        "recall": float(recall),
        "pairs": int(len(labels)),
    }


def search_eval_set(
    eval_set: EvalSet, embeddings: np.ndarray, *, top_k: int = 100
) -> dict[str, dict[str, float]]:
    """The retrieval run of an eval set: each query (its own text's row of ``embeddings``, which are
    the corpus texts' unit vectors in corpus order) against all corpus texts, its own text left out."""
    corpus = eval_set.retrieval.corpus
    position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    queries = eval_set.retrieval.queries["query_id"].tolist()
    return search_index(
        exact_index(embeddings),
        corpus.ids,
        queries,
        embeddings[[position[eval_set.query_doc(q)] for q in queries]],
        top_k=top_k,
        exclude=eval_set.exclude,
    )


def evaluate_labelled(
    model: Any,
    eval_set: EvalSet,
    *,
    system: str | None = None,
    top_k: int = 100,
    batch_size: int = 64,
    max_seq_length: int | None = 128,
    show_progress: bool = True,
) -> LabelledReport:
    """Retrieval and pair-classification metrics of a model (a name, a directory, or loaded)."""
    from tasks.core.models import load_sentence_transformer

    start = time.time()
    name = system or (str(model) if isinstance(model, (str, Path)) else "model")
    encoder = (
        load_sentence_transformer(model, max_seq_length=max_seq_length)
        if isinstance(model, (str, Path))
        else model
    )
    corpus = eval_set.retrieval.corpus
    embeddings = encode_texts(
        encoder,
        corpus.texts(),
        batch_size=batch_size,
        show_progress=show_progress,
        desc="encoding evaluation texts",
    )
    run = search_eval_set(eval_set, embeddings, top_k=top_k)
    retrieval = report_from_run(name, eval_set.retrieval, run, seconds=time.time() - start)
    position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    row_of_text = {
        text: position[doc_id] for doc_id, text in zip(corpus.ids, corpus.docs["text"], strict=True)
    }
    left = embeddings[[row_of_text[t] for t in eval_set.pairs["text1"]]]
    right = embeddings[[row_of_text[t] for t in eval_set.pairs["text2"]]]
    scores = np.sum(left * right, axis=1)
    classification = classification_metrics(scores, eval_set.pairs["label"].to_numpy())
    return LabelledReport(
        system=name, retrieval=retrieval, classification=classification, seconds=round(time.time() - start, 2)
    )


def labelled_markdown(
    before: LabelledReport,
    after: LabelledReport,
    eval_set: EvalSet,
    *,
    metrics: Sequence[str] = ("nDCG@10", "MRR@10", "MAP@100", "Recall@10", "Hit@10"),
    n_examples: int = 6,
) -> str:
    """Before/after table (retrieval, then pair classification) and example matches."""
    from tasks.core.report import before_after_markdown, example_matches, examples_markdown

    lines = ["| pair classification | before | after | change |", "|---|---:|---:|---:|"]
    for metric in PAIR_METRICS:
        b, a = before.classification[metric], after.classification[metric]
        how = "average precision" if metric == "AP" else "at the best threshold"
        lines.append(f"| {metric} ({how}) | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    texts = dict(zip(eval_set.retrieval.corpus.ids, eval_set.retrieval.corpus.docs["text"], strict=True))
    query_table = eval_set.retrieval.queries
    examples = example_matches(
        before.retrieval,
        after.retrieval,
        dict(zip(query_table["query_id"], query_table["text"], strict=True)),
        texts,
        eval_set.retrieval.qrels,
        n=n_examples,
        metric="MRR@10",
    )
    return "\n\n".join(
        [
            f"Evaluation set: {eval_set.summary}.",
            "**Retrieval** (each query against all evaluation texts, itself left out)",
            before_after_markdown(before.retrieval, after.retrieval, metrics),
            "**Pair classification** (cosine similarity)",
            "\n".join(lines),
            "**Example matches** (top 3 before and after; ✅ a labelled duplicate)",
            examples_markdown(examples),
        ]
    )


def evaluate_prepared(
    model: str | Path,
    prepared: PreparedData,
    output: str | Path,
    *,
    split: str = "eval",
    system: str | None = None,
    batch_size: int = 64,
    max_seq_length: int | None = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a model on a stored split; the full report goes to ``output`` (JSON), the
    headline metrics are returned."""
    eval_set = build_eval_set(prepared.load(split), seed=seed)
    report = evaluate_labelled(
        str(model),
        eval_set,
        system=system or str(model),
        batch_size=batch_size,
        max_seq_length=max_seq_length,
    )
    report.save(output)
    return {
        "report": str(output),
        "metrics": report.metrics,
        "seconds": report.seconds,
        "summary": eval_set.summary,
    }
