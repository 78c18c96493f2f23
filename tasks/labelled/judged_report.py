"""The report of fine-tuning from judged queries over a corpus: dense and hybrid before/after on the
evaluation queries, example matches, what the data reader and the list builder decided, timings."""

from __future__ import annotations

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


def judged_report(
    *,
    workspace: Path,
    model_name: str,
    corpus: Any,
    train: Any,
    eval_data: Any,
    eval_note: str,
    evaluation: dict[str, tuple[Any, Any]],
    mode: str,
    weights: dict[str, Any],
    identical: int,
    lists: dict[str, int],
    notes: dict[str, Any],
    result: Any,
    search: Any,
    search_markdown: str | None,
    settings: dict[str, Any],
    decision: Any,
    stages: dict[str, Any],
    output: Path | None,
    stamp: str,
) -> dict[str, Any]:
    """The summary dict (saved as ``output`` or ``reports/supervised-<stamp>.json``) with its markdown.

    ``evaluation`` is {"dense": (before, after), "hybrid": (before, after)}; ``mode`` the served one;
    ``weights`` the BM25 weight choices (``teacher``, ``after``); ``lists`` the list counts
    (``judged``, ``pseudo``, ``positives_added``, ``filtered``); ``notes`` the reader's counts;
    ``search`` the search's result (or None) with its trials table ``search_markdown``; ``settings``
    the training settings used."""
    path = Path(output) if output else Path(workspace) / "reports" / f"supervised-{stamp}.json"
    plot = plot_series(
        result.loss_series(),
        path.with_name(path.stem + "-loss.png"),
        title="listwise KL + judged contrastive loss",
        xlabel="step",
        ylabel="loss",
    )
    (before, after), (hybrid_before, hybrid_after) = evaluation["dense"], evaluation["hybrid"]
    examples = served_examples(corpus, eval_data, *evaluation[mode])
    notes_said = data_notes(
        corpus,
        identical,
        f"{notes['dropped_training_judgments']} training judgment(s) naming a left-out document dropped"
        if notes["dropped_training_judgments"]
        else "",
        f"{eval_data.dropped_judgments} evaluation judgment(s) naming a left-out document not evaluated"
        if eval_data.dropped_judgments
        else "",
        f"{notes['shared_queries']} quer(ies) judged in both files: evaluated, not trained on"
        if notes["shared_queries"]
        else "",
    )
    summary: dict[str, Any] = {
        "name": model_name,
        "version": decision.version,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "metric": f"{mode} nDCG@10",
        "kind": "judged queries over a corpus",
        "loss": "listwise KL + judged contrastive" + (" (with pseudo-labels)" if lists["pseudo"] else ""),
        "serve_mode": mode,
        "eval": eval_note,
        "ndcg@10_before": before.primary,
        "ndcg@10_after": after.primary,
        "hybrid_ndcg@10_before": hybrid_before.primary,
        "hybrid_ndcg@10_after": hybrid_after.primary,
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "metrics_before_hybrid": hybrid_before.metrics,
        "metrics_after_hybrid": hybrid_after.metrics,
        "per_query_before": before.per_query,
        "per_query_after": after.per_query,
        "per_query_before_hybrid": hybrid_before.per_query,
        "per_query_after_hybrid": hybrid_after.per_query,
        "bm25_weight_teacher": weights["teacher"].to_dict(),
        "bm25_weight_after": weights["after"].to_dict(),
        "rows": {"train": len(train.queries), "eval": len(eval_data.queries), "pseudo": lists["pseudo"]},
        "lists": lists,
        "data": {**notes, "left_out_documents": len(corpus.skipped), "identical_id_queries": identical},
        "train": {
            "steps": result.steps,
            "seconds": result.seconds,
            "rows": result.train_rows,
            "stopped_early": result.stopped_early,
            "resumed_from": result.resumed_from,
        },
        "settings": settings,
        "search": search.to_dict() if search is not None else None,
        "timings": stages,
        "loss_plot": str(plot),
        "examples": examples,
    }
    write_json_atomic(path, summary)
    summary["report"] = str(path)
    summary["markdown"] = "\n\n".join(
        [
            f"# Fine-tuning of {md(model_name)} on judged queries: {decision.version} "
            f"{'promoted' if decision.promoted else 'not promoted'}",
            f"**Decision** ({md(mode)} retrieval, the one served): {md(decision.reason)}",
            f"**Training**: {len(train.queries)} judged queries ({md(train.folder)} [{md(train.split)}])"
            + (f" and {lists['pseudo']} generated queries with teacher lists" if lists["pseudo"] else "")
            + f"; {lists['positives_added']} judged documents outside the teacher's top added to their "
            f"lists; {lists['filtered']} unjudged candidates above every judged one kept out of the "
            "contrastive term.",
            f"**Evaluation set**: {md(eval_note)}, retrieval over the whole corpus ({len(corpus)} documents)"
            + "".join(f"; {md(n)}" for n in notes_said),
            "## Dense",
            before_after_markdown(before, after),
            "## Hybrid (dense + BM25)",
            before_after_markdown(hybrid_before, hybrid_after),
            f"BM25 weight: teacher {md(weights['teacher'].describe())}; after training "
            f"{md(weights['after'].describe())}.",
            f"## Example matches ({md(mode)}, top 3, before | after; ✅ relevant)",
            examples_markdown(examples),
            *(
                [f"## Search ({len(search.trials)} trials, nDCG@10 on validation queries)", search_markdown]
                if search is not None
                else []
            ),
            "## Stages",
            timings_markdown(stages),
            f"Training: {result.steps} steps in {result.seconds:.0f} s; loss curve: {md_code(plot)}; "
            f"report: {md_code(path)}",
        ]
    )
    return summary
