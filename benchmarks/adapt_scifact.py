"""Unsupervised adaptation (the default offline preset) end to end on SciFact.

Trains on the corpus only (no labels: the offline generator writes the queries, the offline
BM25 + dense teacher labels them) and evaluates before/after on SciFact's 300 test queries.
No setting here was chosen by looking at the test queries; the teacher's BM25 weight was
chosen on SciFact's train claims (809 queries).

Writes benchmarks/results/adapt_scifact.json: top-level `ndcg@10_before`, `ndcg@10_after`,
`total_seconds`, per-stage seconds and throughput, and the steps trained.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument(
        "--workspace",
        type=Path,
        default=Path("/tmp/adapt-scifact-benchmark"),
        help="scratch workspace, emptied first so every stage runs from scratch",
    )
    parser.add_argument("--train-minutes", type=float, default=20.0, help="training time budget")
    parser.add_argument(
        "--max-steps", type=int, default=400, help="planned optimizer steps (LR schedule length)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the workspace's finished stages (debugging; the timings then are not a full run)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "adapt_scifact.json")
    args = parser.parse_args()

    from rich.console import Console

    from flows.adapt_text import AdaptTextConfig, adapt_text_flow
    from tasks.core.store import write_json_atomic

    if not args.resume:
        shutil.rmtree(args.workspace, ignore_errors=True)
    settings = {
        "corpus": str(args.data),
        "eval": str(args.data),
        "eval_split": "test",
        "workspace": str(args.workspace),
        "train": {
            "time_budget_minutes": args.train_minutes,
            "max_steps": args.max_steps,
            "max_seq_length": 128,
        },
    }
    config = AdaptTextConfig.model_validate(settings)
    start = time.time()
    report = adapt_text_flow(config)
    total = round(time.time() - start, 1)
    Console().print(report["markdown"])
    stages = {
        name: {
            **stage,
            "items_per_second": round(stage["items"] / stage["seconds"], 2)
            if stage.get("items") and stage["seconds"]
            else None,
        }
        for name, stage in report["stages"].items()
    }
    result = {
        "ndcg@10_before": round(report["ndcg@10_before"], 4),
        "ndcg@10_after": round(report["ndcg@10_after"], 4),
        "total_seconds": total,
        "target_ndcg@10": 0.70,
        "steps": report["train"]["steps"],
        "train": report["train"],
        "stages": stages,
        "promoted": report["promoted"],
        "decision": report["decision"],
        "eval_set": report["eval_set"],
        "queries_generated": report["queries_generated"],
        "queries_kept": report["queries_kept"],
        "metrics_before": report["metrics_before"],
        "metrics_after": report["metrics_after"],
        "settings": config.model_dump(mode="json", exclude={"corpus", "eval", "workspace"}),
        "dataset": args.data.name,
        "resumed_workspace": args.resume,
        "machine": {"cpus": 2, "python": platform.python_version()},
    }
    write_json_atomic(args.output, result)
    print(
        f"nDCG@10 before {result['ndcg@10_before']:.4f}  after {result['ndcg@10_after']:.4f}  "
        f"total {total / 60:.1f} min  ->  {args.output}"
    )


if __name__ == "__main__":
    main()
