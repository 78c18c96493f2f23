"""Supervised fine-tuning on Quora question pairs: train on dev.tsv, evaluate on test.tsv.

Reads ../shared/data/quora-question-pairs (override with --data). Evaluation on test.tsv only:
retrieval (each duplicate row's question1 queries all distinct test questions, its own text left
out; that row's question2 is relevant: the reading the issue's zero-shot MRR@10 0.752 was measured
with, see benchmarks/quora_protocols.py) and pair classification (accuracy, F1, AP of the cosine
score).

1. all-MiniLM-L6-v2 zero-shot ("before");
2. fine-tuned with the default settings on all of dev.tsv ("after");
3. a --trials hyper-parameter search (Optuna, seeded; the first trial is the default settings):
   dev.tsv is split 80/20 with no question shared, trials train on a random --search-train-pairs
   of the 80% and are scored by MRR@10 on a random --search-validation-pairs of the 20%, then the
   best trial's settings are trained on all of dev.tsv and evaluated on test.tsv. The subsample
   and the space (one epoch per trial) keep the whole run near 35 minutes on 2 CPU cores.

Nothing is tuned on test.tsv. Writes benchmarks/results/supervised_quora.json with top-level
`mrr@10_before`, `mrr@10_after`, `ap_before`, `ap_after` (the default settings), the search's
trials and its best model's test metrics, timings and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def quora_parser(doc: str) -> argparse.ArgumentParser:
    """The argument parser of the Quora benchmarks: the script's docstring as help, and --data."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "quora-question-pairs",
        help="the folder of dev.tsv and test.tsv (default: %(default)s)",
    )
    return parser


def sample_pairs(data, n: int | None):
    """A seeded random ``n`` of the rows (all of them when n is None or not smaller)."""
    import numpy as np

    if n is None or n >= len(data):
        return data
    chosen = np.zeros(len(data), dtype=bool)
    chosen[np.random.default_rng(SEED).choice(len(data), n, replace=False)] = True
    return data.subset(chosen)


def main() -> None:
    parser = quora_parser(__doc__)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "supervised_quora.json"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=ROOT / "adapt-workspace" / "benchmarks" / "supervised_quora",
        help="models and the search's study (a rerun resumes the search)",
    )
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument(
        "--search-train-pairs",
        type=int,
        default=2000,
        help="pairs of the 80%% split each trial trains on (random, seeded)",
    )
    parser.add_argument(
        "--search-validation-pairs",
        type=int,
        default=1000,
        help="pairs of the 20%% split trials are scored on (random, seeded)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N pairs of each file: a quick check of the script, written to "
        "the work folder instead of benchmarks/results",
    )
    args = parser.parse_args()
    if args.limit:
        args.workdir = args.workdir.with_name(f"{args.workdir.name}-limit{args.limit}")
        if args.output == parser.get_default("output"):
            args.output = args.workdir / "supervised_quora.json"

    from rich.console import Console
    from rich.table import Table

    from finetune.hparam_report import trials_markdown
    from finetune.hparam_search import SearchSettings, run_search
    from finetune.supervised import TrainSettings, train_supervised
    from tasks.core.store import stage_key, write_json_atomic
    from tasks.labelled.eval_set import build_eval_set
    from tasks.labelled.evaluation import evaluate_labelled
    from tasks.labelled.readers import read_labelled_pairs
    from tasks.labelled.splits import shared_texts, split_no_shared_text

    console = Console()
    load_start = os.getloadavg()
    start = time.time()
    timings: dict[str, float] = {}
    dev = read_labelled_pairs(args.data / "dev.tsv")
    test = read_labelled_pairs(args.data / "test.tsv")
    if args.limit:
        dev, test = dev.subset(slice(0, args.limit)), test.subset(slice(0, args.limit))
    test_set = build_eval_set(test, seed=SEED, queries="rows")
    # The source's dev and test share no pair, but some questions: training sees them (with other partners).
    in_both = len(shared_texts(dev, test))
    console.print(
        f"dev: {len(dev)} pairs; test: {test_set.summary}; questions in both dev and test: {in_both}"
    )

    def evaluate(model: str, system: str):
        clock = time.time()
        report = evaluate_labelled(
            model, test_set, system=system, max_seq_length=TrainSettings().max_seq_length
        )
        timings[f"evaluate {system}"] = round(time.time() - clock, 1)
        return report

    def train(settings: TrainSettings, name: str, data=dev):
        # keyed by settings (with the loss "auto" stands for) and data: a finished model of an
        # interrupted run is reused, a stale one never
        resolved = settings.model_copy(update={"loss": settings.resolved_loss(data.kind)})
        target = (
            args.workdir / f"{name}-{stage_key('train', resolved.model_dump(mode='json'), inputs=[data.key])}"
        )
        if not (target / "modules.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            result = train_supervised(data, settings, target)
            timings[f"train {name}"] = result.seconds
        return str(target)

    before = evaluate("all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
    defaults = TrainSettings(seed=SEED)
    default_dir = train(defaults, "default")
    after = evaluate(default_dir, "fine-tuned (defaults)")
    # the headline numbers, kept in the work folder in case the search that follows is cut off
    headline = {
        f"{m}_{when}": round(r.metric(name), 4)
        for m, name in (("mrr@10", "MRR@10"), ("ap", "pair AP"))
        for when, r in (("before", before), ("after", after))
    }
    write_json_atomic(args.workdir / "headline.json", {**headline, "timings_seconds": dict(timings)})

    # the search: trained on 80% of dev, scored on the other 20%, never on test
    clock = time.time()
    search_train, search_validation = split_no_shared_text(dev, 0.2, seed=SEED)
    search_train = sample_pairs(search_train, args.search_train_pairs)
    search_validation = sample_pairs(search_validation, args.search_validation_pairs)
    # one epoch per trial: two would double a trial, and the refit on all of dev.tsv after it
    space = SearchSettings(
        search=args.trials, search_epochs=[1], search_batch_sizes=[32, 64], search_evaluations=2
    )
    search = run_search(
        search_train,
        build_eval_set(search_validation, seed=SEED),
        base=defaults,
        space=space,
        workdir=args.workdir / "search",
        metric="MRR@10",
    )
    timings["search"] = round(time.time() - clock, 1)
    best_settings = defaults.model_copy(update=search.best_params)
    resolved_defaults = defaults.model_copy(update={"loss": defaults.resolved_loss("pairs")})
    if best_settings.model_dump() == resolved_defaults.model_dump():
        # the defaults won: that model is already trained on all of dev
        best_dir, best_after = default_dir, after
    else:
        best_dir = train(best_settings, "search-best")
        best_after = evaluate(best_dir, "fine-tuned (search's best)")

    table = Table(title=f"Quora test: {test_set.summary}")
    table.add_column("metric", style="bold")
    for column in ("zero-shot", "defaults", "search's best"):
        table.add_column(column, justify="right")
    for metric in ("nDCG@10", "MRR@10", "Recall@10", "pair accuracy", "pair F1", "pair AP"):
        table.add_row(metric, *(f"{r.metric(metric):.4f}" for r in (before, after, best_after)))
    console.print(table)
    console.print(trials_markdown(search))

    def rounded(metrics):
        return {k: round(v, 4) for k, v in metrics.items()}

    result = {
        "mrr@10_before": round(before.metric("MRR@10"), 4),
        "mrr@10_after": round(after.metric("MRR@10"), 4),
        "ap_before": round(before.metric("pair AP"), 4),
        "ap_after": round(after.metric("pair AP"), 4),
        "ndcg@10_before": round(before.metric("nDCG@10"), 4),
        "ndcg@10_after": round(after.metric("nDCG@10"), 4),
        "target": "MRR@10 >= 0.80 after, and pair-classification AP up",
        "dataset": "quora-question-pairs",
        "train": {"file": "dev.tsv", "pairs": len(dev), "duplicates": int(dev.rows["label"].sum())},
        "test": {
            "file": "test.tsv",
            "summary": test_set.summary,
            "questions_also_in_dev": in_both,
            "retrieval": "question1 of each duplicate row against all distinct test questions, its own text "
            "left out; only that row's question2 relevant (the issue's reading)",
            "pair_classification": "cosine similarity, accuracy and F1 at the best threshold, average precision",
        },
        "before": {
            "model": "all-MiniLM-L6-v2",
            "metrics": rounded(before.metrics),
            "classification": rounded(before.classification),
        },
        "after": {
            "settings": defaults.model_dump(mode="json"),
            "loss": defaults.resolved_loss("pairs"),
            "metrics": rounded(after.metrics),
            "classification": rounded(after.classification),
        },
        "search": {
            "trials": args.trials,
            "objective": "MRR@10 on a random sample of a 20% slice of dev.tsv; trials train on a random sample "
            "of the other 80% (no question shared)",
            "train_pairs": len(search_train),
            "validation_pairs": len(search_validation),
            "space": space.model_dump(mode="json"),
            "study": search.study_name,
            "best_trial": search.best_trial,
            "best_value": round(search.best_value, 4),
            "best_params": search.best_params,
            "default_trial": search.default_trial,
            "default_value": None if search.default_value is None else round(search.default_value, 4),
            "best_at_least_default": search.default_value is None
            or search.best_value >= search.default_value,
            "trials_table": [
                {
                    k: t[k]
                    for k in (
                        "number",
                        "state",
                        "value",
                        "default",
                        "model",
                        "loss",
                        "learning_rate",
                        "batch_size",
                        "epochs",
                        "warmup_ratio",
                        "seconds",
                    )
                }
                for t in search.trials
            ],
            "best_refit_on_dev": {
                "settings": best_settings.model_dump(mode="json"),
                "metrics": rounded(best_after.metrics),
            },
        },
        "timings_seconds": {**timings, "total": round(time.time() - start, 1)},
        "load_average": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in os.getloadavg()],
        },
        "machine": {
            **machine_info(),
            "note": "timings inflated when the load average exceeds the CPU count",
        },
        "seed": SEED,
        "limit": args.limit,
    }
    write_json_atomic(args.output, result)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
