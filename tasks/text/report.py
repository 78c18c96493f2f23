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
    data_notes,
    examples_markdown,
    plot_series,
    served_examples,
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
    evaluation: dict[str, tuple[Any, Any]],
    mode: str,
    weights: dict[str, Any],
    identical: int,
    result: Any,
    method: str,
    version: str,
    decision: Any,
    stages: dict[str, Any],
    total_seconds: float,
) -> dict[str, Any]:
    """The summary dict (also saved as ``reports/adapt-text-<time>.json``) with its ``markdown``.

    ``evaluation`` is {"dense": (before, after), "hybrid": (before, after)}; ``mode`` the one served
    and gated; ``weights`` the BM25 weight choices (``teacher``, ``after``: WeightChoice; ``before``:
    the number the "before" hybrid used); ``identical`` how many queries had their own id left out."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = Path(workspace) / "reports"
    plot = plot_series(
        result.loss_series(),
        reports / f"adapt-text-{stamp}-loss.png",
        title=f"{'listwise KL' if method == 'listwise' else 'MarginMSE'} loss",
        xlabel="step",
        ylabel="loss",
    )
    (before, after), (hybrid_before, hybrid_after) = evaluation["dense"], evaluation["hybrid"]
    examples = served_examples(corpus, eval_data, *evaluation[mode])
    dropped = getattr(eval_data, "dropped_judgments", 0)
    notes = data_notes(
        corpus,
        identical,
        f"{dropped} judgment(s) naming a left-out document not evaluated" if dropped else "",
    )
    summary: dict[str, Any] = {
        "ndcg@10_before": before.primary,
        "ndcg@10_after": after.primary,
        "hybrid_ndcg@10_before": hybrid_before.primary,
        "hybrid_ndcg@10_after": hybrid_after.primary,
        "serve_mode": mode,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "model": model_name,
        "version": version,
        "method": method,
        "eval_set": eval_note,
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "metrics_before_hybrid": hybrid_before.metrics,
        "metrics_after_hybrid": hybrid_after.metrics,
        "bm25_weight_teacher": weights["teacher"].to_dict(),
        "bm25_weight_after": weights["after"].to_dict(),
        "bm25_weight_before": weights["before"],
        "identical_id_queries": identical,
        "left_out_documents": len(corpus.skipped),
        "dropped_judgments": dropped,
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
            f"**Decision** ({md(mode)} retrieval, the one served): {md(decision.reason)}",
            f"**Evaluation set**: {md(eval_note)}" + "".join(f"; {md(n)}" for n in notes),
            "## Dense",
            before_after_markdown(before, after),
            "## Hybrid (dense + BM25)",
            before_after_markdown(hybrid_before, hybrid_after),
            f"BM25 weight: teacher {md(weights['teacher'].describe())}; after training "
            f"{md(weights['after'].describe())}; before: {weights['before']:g}.",
            f"## Example matches ({md(mode)}, top 3, before | after; ✅ relevant)",
            examples_markdown(examples),
            "## Stages",
            timings_markdown(stages),
            f"Training ({md(method)}): {result.steps} steps in {result.seconds:.0f} s; loss curve: "
            f"{md_code(plot)}; report: {md_code(path)}",
        ]
    )
    return summary
