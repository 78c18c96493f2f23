"""Judged queries over a corpus on SciFact: `adapt supervised --train FOLDER --train-split train`.

Trains on SciFact's 809 train claims (919 judgments) over the whole corpus and evaluates retrieval
over the whole corpus on the 300 test claims, and on the 104 of them whose relevant documents no
train claim cites ("unseen": the rest share a relevant document with a train claim, so a gain there
is partly a learnt prior toward cited abstracts). Three models against the start model: the
unsupervised flow alone (`adapt text`, which also fills the store with its generated queries and
teacher lists), labels only, and labels plus those pseudo-labels (read from the store, not made
again). All in one scratch workspace, emptied first.

Writes benchmarks/results/supervised_scifact.json: `ndcg@10_before`, `ndcg@10_labels`,
`ndcg@10_labels_plus_pseudo`, `ndcg@10_unsupervised`, the same four with an `unseen_` prefix,
`recall@100_before`, `recall@100_after` (labels plus pseudo-labels, the fuller model), the hybrid's,
`total_seconds` (the two supervised runs; the unsupervised one is timed apart) and the targets.
A third supervised run trains on the same labels and pseudo-labels from `adapt text`'s model (its
query side; the documents stay the base model's): the `_on_unsupervised` keys, with the targets
checked for it too and its time counted with the unsupervised run's
(`total_seconds_on_unsupervised`).

``--dev`` chooses settings without the test claims: it trains on the train claims less a fifth of
them (carved by a hash of the query id) and evaluates on that fifth; "unseen" are then the carved
claims whose relevant documents no training claim cites. ``--set key=value`` overrides a setting
(``listwise.label_weight=2``); each dev run appends a row to results/supervised_dev.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``a.b=value`` strings as a nested dict (values read as JSON where they parse)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def unseen_queries(train_qrels: dict, eval_qrels: dict) -> set[str]:
    """Evaluation queries none of whose relevant documents is relevant to a training query."""
    cited = {d for docs in train_qrels.values() for d, g in docs.items() if g > 0}
    return {q for q, docs in eval_qrels.items() if not any(g > 0 and d in cited for d, g in docs.items())}


def mean_over(per_query: dict[str, dict[str, float]], ids: set[str], metric: str = "nDCG@10") -> float:
    """Mean of ``metric`` over ``ids`` (``per_query`` is metric -> query -> value, as EvalReport keeps
    it; a query with no value scored 0)."""
    values = per_query[metric]
    return round(sum(values.get(q, 0.0) for q in ids) / max(1, len(ids)), 4)


def run_supervised(settings: dict[str, Any]) -> dict[str, Any]:
    from flows.supervised import SupervisedConfig, supervised_flow

    config = SupervisedConfig.model_validate(settings)
    began = time.time()
    report = supervised_flow(config)
    report["wall_seconds"] = round(time.time() - began, 1)
    report["settings"] = config.model_dump(mode="json", include={"listwise", "lists", "with_pseudo_labels"})
    return report


def dense_per_query(model_dir: str, data: Any, workspace: Path) -> dict[str, dict[str, float]]:
    """Per-query dense metrics of a query-side model (documents by the base model, as it serves them)."""
    from tasks.core.defaults import BASE_MODEL
    from tasks.core.embeddings import cache_for
    from tasks.core.evaluation import evaluate_cached, identical_ids
    from tasks.core.models import resolve_model

    docs = cache_for(resolve_model(BASE_MODEL), workspace, max_seq_length=256)
    queries = cache_for(resolve_model(model_dir), workspace, max_seq_length=256)
    return evaluate_cached(
        queries, data, "unsupervised", doc_cache=docs, exclude=identical_ids(data)
    ).per_query


def dev(args: argparse.Namespace) -> None:
    """One dev run on the train claims (a fifth carved off for evaluation); a row in supervised_dev.jsonl."""
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.settings import deep_merge
    from tasks.labelled.judged import carve_by_query

    overrides = parse_sets(args.set)
    settings = deep_merge(
        {"train": str(args.data), "train_split": "train", "workspace": str(args.workspace), "promote": False},
        overrides,
    )
    report = run_supervised(settings)
    config_fraction = settings.get("eval_fraction", 0.2)
    judged = read_judged_queries(args.data, "train", read_corpus(args.data))
    train, held = carve_by_query(judged, config_fraction)
    unseen = unseen_queries(train.qrels, held.qrels)
    row = {
        "run": args.label or json.dumps(overrides, sort_keys=True),
        "overrides": overrides,
        "queries": {"train": len(train.queries), "eval": len(held.queries), "unseen": len(unseen)},
        "ndcg@10_before": round(report["ndcg@10_before"], 4),
        "ndcg@10_after": round(report["ndcg@10_after"], 4),
        "unseen_ndcg@10_before": mean_over(report["per_query_before"], unseen),
        "unseen_ndcg@10_after": mean_over(report["per_query_after"], unseen),
        "recall@100_before": round(report["metrics_before"]["Recall@100"], 4),
        "recall@100_after": round(report["metrics_after"]["Recall@100"], 4),
        "hybrid_ndcg@10_before": round(report["hybrid_ndcg@10_before"], 4),
        "hybrid_ndcg@10_after": round(report["hybrid_ndcg@10_after"], 4),
        "unseen_hybrid_ndcg@10_before": mean_over(report["per_query_before_hybrid"], unseen),
        "unseen_hybrid_ndcg@10_after": mean_over(report["per_query_after_hybrid"], unseen),
        "steps": report["train"]["steps"],
        "train_seconds": report["train"]["seconds"],
        "pseudo_queries": report["rows"]["pseudo"],
        "settings": report["settings"],
        "machine": machine_info(),
    }
    with (RESULTS / "supervised_dev.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in {"settings", "machine"}}, indent=1))


def full(args: argparse.Namespace) -> None:
    from flows.adapt_text import AdaptTextConfig, adapt_text_flow
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.settings import deep_merge
    from tasks.core.store import write_json_atomic

    if not args.resume:
        shutil.rmtree(args.workspace, ignore_errors=True)
    overrides = parse_sets(args.set)
    corpus = read_corpus(args.data)
    test = read_judged_queries(args.data, "test", corpus)
    train = read_judged_queries(args.data, "train", corpus)
    unseen = unseen_queries(train.qrels, test.qrels)
    everyone = set(test.queries["query_id"])

    began = time.time()  # the unsupervised flow first: its generated queries and lists go to the store
    unsupervised = adapt_text_flow(
        AdaptTextConfig(corpus=args.data, eval=args.data, workspace=args.workspace, promote_min_delta=0.0)
    )
    unsupervised_seconds = round(time.time() - began, 1)
    unsupervised_dir = str(Path(args.workspace) / "models" / "text-retriever" / unsupervised["version"])
    unsupervised_queries = dense_per_query(unsupervised_dir, test, args.workspace)

    base = {
        "train": str(args.data),
        "train_split": "train",
        "eval": str(args.data),
        "eval_split": "test",
        "workspace": str(args.workspace),
    }
    labels = run_supervised(deep_merge(base, overrides))
    both = run_supervised(deep_merge(deep_merge(base, {"with_pseudo_labels": True}), overrides))
    # the same labels and pseudo-labels, training on from `adapt text`'s model instead of the base
    on_top = run_supervised(
        deep_merge(deep_merge(base, {"with_pseudo_labels": True, "model": unsupervised_dir}), overrides)
    )
    lists_stage = both["timings"].get("candidate lists", {})
    result = {
        "ndcg@10_before": round(labels["ndcg@10_before"], 4),
        "ndcg@10_labels": round(labels["ndcg@10_after"], 4),
        "ndcg@10_labels_plus_pseudo": round(both["ndcg@10_after"], 4),
        "ndcg@10_unsupervised": mean_over(unsupervised_queries, everyone),
        "ndcg@10_labels_plus_pseudo_on_unsupervised": round(on_top["ndcg@10_after"], 4),
        "unseen_ndcg@10_before": mean_over(labels["per_query_before"], unseen),
        "unseen_ndcg@10_labels": mean_over(labels["per_query_after"], unseen),
        "unseen_ndcg@10_labels_plus_pseudo": mean_over(both["per_query_after"], unseen),
        "unseen_ndcg@10_unsupervised": mean_over(unsupervised_queries, unseen),
        "unseen_ndcg@10_labels_plus_pseudo_on_unsupervised": mean_over(on_top["per_query_after"], unseen),
        "recall@100_before": round(labels["metrics_before"]["Recall@100"], 4),
        "recall@100_labels": round(labels["metrics_after"]["Recall@100"], 4),
        "recall@100_after": round(both["metrics_after"]["Recall@100"], 4),
        "recall@100_on_unsupervised": round(on_top["metrics_after"]["Recall@100"], 4),
        "hybrid_ndcg@10_before": round(labels["hybrid_ndcg@10_before"], 4),
        "hybrid_ndcg@10_labels": round(labels["hybrid_ndcg@10_after"], 4),
        "hybrid_ndcg@10_labels_plus_pseudo": round(both["hybrid_ndcg@10_after"], 4),
        "hybrid_ndcg@10_labels_plus_pseudo_on_unsupervised": round(on_top["hybrid_ndcg@10_after"], 4),
        "queries": {"test": len(everyone), "unseen": len(unseen), "train": len(train.queries)},
        "total_seconds": round(labels["wall_seconds"] + both["wall_seconds"], 1),
        "total_seconds_on_unsupervised": round(unsupervised_seconds + on_top["wall_seconds"], 1),
        "seconds": {
            "labels": labels["wall_seconds"],
            "labels_plus_pseudo": both["wall_seconds"],
            "labels_plus_pseudo_on_unsupervised": on_top["wall_seconds"],
            "unsupervised_adapt_text": unsupervised_seconds,
            "pseudo_lists_read_from_store": lists_stage.get("seconds"),
        },
        "steps": {
            "labels": labels["train"]["steps"],
            "labels_plus_pseudo": both["train"]["steps"],
            "labels_plus_pseudo_on_unsupervised": on_top["train"]["steps"],
        },
        "pseudo_queries": both["rows"]["pseudo"],
        "decisions": {
            "labels": labels["decision"],
            "labels_plus_pseudo": both["decision"],
            "labels_plus_pseudo_on_unsupervised": on_top["decision"],
        },
        "settings": labels["settings"],
        "machine": machine_info(),
    }
    result["targets"] = {
        "labels_at_least_0.80": result["ndcg@10_labels"] >= 0.80,
        "unseen_labels_at_least_before": result["unseen_ndcg@10_labels"] >= result["unseen_ndcg@10_before"],
        "unseen_labels_plus_pseudo_at_least_0.70": result["unseen_ndcg@10_labels_plus_pseudo"] >= 0.70,
        "unseen_labels_plus_pseudo_at_least_unsupervised": result["unseen_ndcg@10_labels_plus_pseudo"]
        >= result["unseen_ndcg@10_unsupervised"],
        "recall@100_not_below_before": result["recall@100_after"] >= result["recall@100_before"],
        "at_most_60_minutes": result["total_seconds"] <= 3600,
        # the same targets for labels + pseudo-labels trained on from `adapt text`'s model
        "on_unsupervised_unseen_at_least_0.70": result["unseen_ndcg@10_labels_plus_pseudo_on_unsupervised"]
        >= 0.70,
        "on_unsupervised_unseen_at_least_unsupervised": result[
            "unseen_ndcg@10_labels_plus_pseudo_on_unsupervised"
        ]
        >= result["unseen_ndcg@10_unsupervised"],
        "on_unsupervised_recall@100_not_below_before": result["recall@100_on_unsupervised"]
        >= result["recall@100_before"],
        "on_unsupervised_at_most_60_minutes": result["total_seconds_on_unsupervised"] <= 3600,
    }
    write_json_atomic(args.output, result)
    print_table(result)
    print(f"-> {args.output}")


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SciFact: judged train claims over the corpus, test claims (nDCG@10)")
    for column in ("claims", "before", "unsupervised", "labels", "labels + pseudo", "the same on unsup."):
        table.add_column(column, justify="right" if column != "claims" else "left")
    for name, prefix in (("all 300", ""), (f"unseen {result['queries']['unseen']}", "unseen_")):
        table.add_row(
            name,
            *(
                f"{result[f'{prefix}ndcg@10_{k}']:.4f}"
                for k in (
                    "before",
                    "unsupervised",
                    "labels",
                    "labels_plus_pseudo",
                    "labels_plus_pseudo_on_unsupervised",
                )
            ),
        )
    Console(width=120).print(table)
    print(f"Recall@100 {result['recall@100_before']:.4f} -> {result['recall@100_after']:.4f}; targets:")
    for name, ok in result["targets"].items():
        print(f"  {'met ' if ok else 'MISS'} {name}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/supervised-scifact-benchmark"))
    parser.add_argument("--dev", action="store_true", help="a dev run on the train claims (see above)")
    parser.add_argument("--label", default="", help="--dev: the row's name")
    parser.add_argument("--set", action="append", default=[], help="a setting, key=value (repeatable)")
    parser.add_argument("--resume", action="store_true", help="keep the workspace (debugging)")
    parser.add_argument("--output", type=Path, default=RESULTS / "supervised_scifact.json")
    args = parser.parse_args()
    (dev if args.dev else full)(args)


if __name__ == "__main__":
    main()
