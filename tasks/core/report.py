"""Pieces of the reports a person reads: before/after tables, example matches, timings, plots."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tasks.core.evaluation import MEASURES, PRIMARY_METRIC, EvalReport, compare_per_query
from tasks.core.markdown import md


def before_after_markdown(before: EvalReport, after: EvalReport, metrics: Sequence[str] | None = None) -> str:
    """Metric | before | after | change, plus the query-by-query tally of the primary metric."""
    metrics = list(metrics or MEASURES)
    lines = [
        f"| metric | before ({md(before.system)}) | after ({md(after.system)}) | change |",
        "|---|---:|---:|---:|",
    ]
    for metric in metrics:
        b, a = before.metrics[metric], after.metrics[metric]
        lines.append(f"| {metric} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    tally = compare_per_query(before, after, PRIMARY_METRIC if PRIMARY_METRIC in metrics else metrics[0])
    lines.append("")
    lines.append(
        f"{tally['metric']} per query: {tally['improved']} improved, {tally['worsened']} worsened, "
        f"{tally['unchanged']} unchanged (of {tally['queries']})."
    )
    return "\n".join(lines)


def example_matches(
    before: EvalReport,
    after: EvalReport,
    query_texts: Mapping[str, str],
    doc_titles: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    n: int = 6,
    k: int = 3,
    metric: str = PRIMARY_METRIC,
) -> list[dict[str, Any]]:
    """Queries that changed most (half improved, half worsened) with their top-k hits before and after."""
    deltas = compare_per_query(before, after, metric)["deltas"]
    ranked = sorted(deltas, key=deltas.get)
    worsened = [q for q in ranked if deltas[q] < 0][: n // 2]
    improved = [q for q in reversed(ranked) if deltas[q] > 0][: n - len(worsened)]
    examples = []
    for query_id in improved + worsened:
        relevant = {d for d, g in qrels.get(query_id, {}).items() if g > 0}

        def hits(report: EvalReport, query_id=query_id, relevant=relevant) -> list[dict[str, Any]]:
            return [
                {"doc_id": d, "title": doc_titles.get(d, ""), "relevant": d in relevant}
                for d in report.top_hits.get(query_id, [])[:k]
            ]

        examples.append(
            {
                "query_id": query_id,
                "query": query_texts.get(query_id, ""),
                "delta": deltas[query_id],
                "before": hits(before),
                "after": hits(after),
            }
        )
    return examples


def served_examples(corpus: Any, data: Any, before: EvalReport, after: EvalReport, *, n: int = 6, k: int = 3):
    """:func:`example_matches` of an evaluation over ``corpus`` (titles, or the text's start where a
    document has none) on ``data``'s queries and judgments (a :class:`tasks.core.corpus.BeirData`)."""
    titles = {
        d: (t or x[:80])
        for d, t, x in zip(corpus.docs["doc_id"], corpus.docs["title"], corpus.docs["text"], strict=True)
    }
    query_texts = dict(zip(data.queries["query_id"], data.queries["text"], strict=True))
    return example_matches(before, after, query_texts, titles, data.qrels, n=n, k=k)


def data_notes(corpus: Any, identical: int, *notes: str) -> list[str]:
    """What the report says of the data, where there is something to say: documents the reader left
    out, the caller's ``notes``, and queries whose own id is never counted as retrieved."""
    every = [
        f"{len(corpus.skipped)} document(s) left out of the corpus (empty)" if corpus.skipped else "",
        *notes,
        f"{identical} quer{'y' if identical == 1 else 'ies'} share an id with a document: that document is "
        "never counted as retrieved for it (as BEIR's ignore_identical_ids)"
        if identical
        else "",
    ]
    return [n for n in every if n]


def examples_markdown(examples: Sequence[Mapping[str, Any]], max_title: int = 70) -> str:
    """Side-by-side top hits; relevant hits marked with a check."""
    if not examples:
        return "_No query changed rank._"
    lines = ["| query | before | after |", "|---|---|---|"]
    for example in examples:

        def cell(hits):
            return "<br>".join(
                f"{'✅' if h['relevant'] else '·'} {md(_clip(h['title'] or h['doc_id'], max_title))}"
                for h in hits
            )

        query = f"{md(_clip(example['query'], 90))} ({example['delta']:+.2f})"
        lines.append(f"| {query} | {cell(example['before'])} | {cell(example['after'])} |")
    return "\n".join(lines)


def timings_markdown(stages: Mapping[str, Mapping[str, Any]]) -> str:
    """Stage | seconds | items | items/s."""
    lines = ["| stage | seconds | items | items/s |", "|---|---:|---:|---:|"]
    for stage, info in stages.items():
        seconds = float(info.get("seconds", 0.0))
        items = info.get("items")
        rate = f"{items / seconds:.1f}" if items and seconds > 0 else ""
        lines.append(f"| {stage} | {seconds:.1f} | {items if items is not None else ''} | {rate} |")
    return "\n".join(lines)


def plot_series(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
) -> Path:
    """A line plot (PNG) of one or more (x, y) series: loss curves, objectives per trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o" if len(points) < 30 else None, label=label)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend()
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:  # written whole or not at all: a full disk leaves no half a PNG
        figure.savefig(staging)
        os.replace(staging, path)
    finally:
        plt.close(figure)
        staging.unlink(missing_ok=True)
    return path


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def publish_markdown(markdown: str, key: str, description: str) -> bool:
    """A Prefect markdown artifact when running inside a flow or task run; a no-op elsewhere."""
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=key, description=description)
    return True
