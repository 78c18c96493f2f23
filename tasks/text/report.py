"""The report of a text adaptation: before/after metrics, example matches, stage timings, loss curve.

Written as JSON under ``<workspace>/reports/`` (with the loss plot next to it) and returned with its
markdown, which the flow publishes as a Prefect artifact and the CLI prints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tasks.core.markdown import md, md_code
from tasks.core.report import (
    before_after_markdown,
    example_matches,
    examples_markdown,
    plot_series,
    timings_markdown,
)
from tasks.core.store import write_json_atomic


def adaptation_report(
    *,
    workspace: Path,
    model_name: str,
    corpus: Any,
    queries: Any,
    manifest: dict[str, Any],
    eval_data: Any,
    eval_note: str,
    before: Any,
    after: Any,
    result: Any,
    version: str,
    decision: Any,
    stages: dict[str, Any],
    total_seconds: float,
) -> dict[str, Any]:
    """The summary dict (also saved as ``reports/adapt-text-<time>.json``) with its ``markdown``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = Path(workspace) / "reports"
    plot = plot_series(
        result.loss_series(),
        reports / f"adapt-text-{stamp}-loss.png",
        title="MarginMSE loss",
        xlabel="step",
        ylabel="loss",
    )
    titles = {
        d: (t or x[:80])
        for d, t, x in zip(corpus.docs["doc_id"], corpus.docs["title"], corpus.docs["text"], strict=True)
    }
    query_texts = dict(zip(eval_data.queries["query_id"], eval_data.queries["text"], strict=True))
    examples = example_matches(before, after, query_texts, titles, eval_data.qrels, n=6, k=3)
    summary: dict[str, Any] = {
        "ndcg@10_before": before.primary,
        "ndcg@10_after": after.primary,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "model": model_name,
        "version": version,
        "eval_set": eval_note,
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "queries_generated": manifest.get("generated"),
        "queries_kept": len(queries),
        "train": {
            "steps": result.steps,
            "seconds": result.seconds,
            "rows": result.train_rows,
            "label_scale": result.label_scale,
            "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from,
        },
        "stages": stages,
        "total_seconds": total_seconds,
        "loss_plot": str(plot),
        "examples": examples,
    }
    path = reports / f"adapt-text-{stamp}.json"
    write_json_atomic(path, summary)
    summary["report"] = str(path)
    summary["markdown"] = "\n\n".join(
        [
            f"# Adaptation of {md(model_name)}: {version} {'promoted' if decision.promoted else 'not promoted'}",
            f"**Decision**: {md(decision.reason)}",
            f"**Evaluation set**: {md(eval_note)}",
            before_after_markdown(before, after),
            "## Example matches (top 3, before | after; ✅ relevant)",
            examples_markdown(examples),
            "## Stages",
            timings_markdown(stages),
            f"Training: {result.steps} steps in {result.seconds:.0f} s; loss curve: {md_code(plot)}; report: {md_code(path)}",
        ]
    )
    return summary
