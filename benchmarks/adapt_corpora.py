"""Unsupervised adaptation with the defaults on every BEIR-layout corpus in ../shared/data.

A folder is a corpus here when it has corpus.jsonl, queries.jsonl and qrels/test.tsv (a new folder
is picked up without a code change). Each run trains on the corpus only (no labels: the offline
generator writes the queries, the offline teacher labels them) and evaluates before/after on the
test judgments, dense and hybrid, with BM25 alone as the reference. One corpus at a time, each in
its own scratch workspace, emptied first so every stage runs from scratch.

Writes benchmarks/results/adapt_corpora.json as {"corpora": {name: {...}}}: per corpus
`ndcg@10_before`, `ndcg@10_after` (dense), `hybrid_ndcg@10_before`, `hybrid_ndcg@10_after`,
`bm25_ndcg@10`, `recall@100_before`, `recall@100_after`, `total_seconds`, per-stage seconds and
throughput, training queries per second, and the targets' pass/fail. The SciFact corpus's result
is also written to benchmarks/results/adapt_scifact.json (see ``--scifact-output``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def beir_folders(data: Path) -> list[Path]:
    return sorted(
        p
        for p in data.iterdir()
        if (p / "corpus.jsonl").is_file()
        and (p / "queries.jsonl").is_file()
        and (p / "qrels" / "test.tsv").is_file()
    )


def run_corpus(folder: Path, workspace: Path, *, resume: bool = False, **overrides: Any) -> dict[str, Any]:
    """`adapt text` with the defaults on one corpus (evaluated on its test judgments) and BM25 alone."""
    from flows.adapt_text import AdaptTextConfig, adapt_text_flow
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.evaluation import evaluate_bm25, identical_ids
    from tasks.core.settings import deep_merge

    if not resume:
        shutil.rmtree(workspace, ignore_errors=True)
    settings = deep_merge(
        {"corpus": str(folder), "eval": str(folder), "eval_split": "test", "workspace": str(workspace)},
        overrides,
    )
    config = AdaptTextConfig.model_validate(settings)
    start = time.time()
    report = adapt_text_flow(config)
    total = round(time.time() - start, 1)
    encoding = encode_check(folder, workspace, config.encode_backend, length=config.mine.max_seq_length)
    data = read_judged_queries(folder, "test", read_corpus(folder))
    bm25 = evaluate_bm25(data, exclude=identical_ids(data))
    stages = {
        name: {
            **stage,
            "items_per_second": round(stage["items"] / stage["seconds"], 2)
            if stage.get("items") and stage["seconds"]
            else None,
        }
        for name, stage in report["stages"].items()
    }
    train = report["train"]
    trained_queries = stages.get("train", {}).get("items") or 0
    before, after = report["metrics_before"], report["metrics_after"]
    result = {
        "ndcg@10_before": round(report["ndcg@10_before"], 4),
        "ndcg@10_after": round(report["ndcg@10_after"], 4),
        "hybrid_ndcg@10_before": round(report["hybrid_ndcg@10_before"], 4),
        "hybrid_ndcg@10_after": round(report["hybrid_ndcg@10_after"], 4),
        "bm25_ndcg@10": round(bm25.primary, 4),
        "recall@100_before": round(before["Recall@100"], 4),
        "recall@100_after": round(after["Recall@100"], 4),
        "hybrid_recall@100_after": round(report["metrics_after_hybrid"]["Recall@100"], 4),
        "total_seconds": total,
        "training_queries_per_second": round(trained_queries / train["seconds"], 2)
        if train["seconds"]
        else None,
        "steps": train["steps"],
        "encode_check": encoding,
        "train": train,
        "stages": stages,
        "serve_mode": report["serve_mode"],
        "promoted": report["promoted"],
        "decision": report["decision"],
        "bm25_weight_teacher": report["bm25_weight_teacher"],
        "bm25_weight_after": report["bm25_weight_after"],
        "identical_id_queries": report["identical_id_queries"],
        "dropped_judgments": report["dropped_judgments"],
        "left_out_documents": report["left_out_documents"],
        "eval_set": report["eval_set"],
        "queries_generated": report["queries_generated"],
        "queries_kept": report["queries_kept"],
        "metrics_before": before,
        "metrics_after": after,
        "metrics_before_hybrid": report["metrics_before_hybrid"],
        "metrics_after_hybrid": report["metrics_after_hybrid"],
        "settings": config.model_dump(mode="json", exclude={"corpus", "eval", "workspace"}),
        "resumed_workspace": resume,
    }
    result["targets"] = {
        "dense_after_at_least_before": result["ndcg@10_after"] >= result["ndcg@10_before"],
        "hybrid_after_at_least_best_before": result["hybrid_ndcg@10_after"]
        >= max(result["bm25_ndcg@10"], result["ndcg@10_before"]),
        "recall@100_not_below_before": result["recall@100_after"] >= result["recall@100_before"],
        "encode_at_least_2x_plain": encoding["speedup"] >= 2.0,
        "encode_parity_at_least_0.99": encoding.get("min_cosine", 1.0) >= 0.99,
    }
    return result


def passage_sample(folder: Path, n: int = 256) -> list[str]:
    """``n`` corpus passages of ``folder``, a seeded sample (the encode checks' texts)."""
    import numpy as np

    from tasks.core.corpus import read_corpus

    texts = read_corpus(folder).texts()
    picks = np.random.default_rng(0).choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in picks]


def plain_encode(length: int):
    """Plain ``SentenceTransformer.encode`` of the base model at ``length`` tokens (the reference
    implementations' path), as ``encode(texts) -> unit rows``."""
    from tasks.core.defaults import BASE_MODEL
    from tasks.core.models import load_sentence_transformer, resolve_model

    model = load_sentence_transformer(resolve_model(BASE_MODEL))
    model.max_seq_length = length
    return lambda batch: model.encode(
        batch, batch_size=64, normalize_embeddings=True, show_progress_bar=False
    )


def timed(encode, texts: list[str]) -> tuple[Any, float]:
    """``encode(texts)`` after a warm-up on 8 of them: (vectors, texts per second)."""
    encode(texts[:8])
    began = time.perf_counter()
    vectors = encode(texts)
    return vectors, len(texts) / (time.perf_counter() - began)


def encode_check(
    folder: Path, workspace: Path, backend: str, *, n: int = 256, length: int = 256
) -> dict[str, Any]:
    """The same ``n`` corpus passages (a seeded sample) through plain ``SentenceTransformer.encode``
    (the reference implementations' path) and through each encoder the flow offers, at the same
    length: throughput of each, its speed-up and the cosine between its embeddings and plain's.
    ``backend`` is the one the flow ran with (its row is ``flow``)."""
    import numpy as np

    from tasks.core.defaults import BASE_MODEL
    from tasks.core.models import resolve_model
    from tasks.core.onnx import ENCODE_BACKENDS, fast_encode

    texts = passage_sample(folder, n)
    resolved = resolve_model(BASE_MODEL)
    plain = plain_encode(length)
    reference, plain_speed = timed(plain, texts)
    out: dict[str, Any] = {"texts": len(texts), "max_seq_length": length, "flow": backend}
    out["plain_texts_per_second"] = round(plain_speed, 2)
    for name in ENCODE_BACKENDS:
        encode = fast_encode(
            resolved.path, resolved.fingerprint, workspace, backend=name, max_seq_length=length
        )
        vectors, speed = timed(encode or plain, texts)  # pytorch is plain encode itself: its row is the noise
        cosines = np.einsum("ij,ij->i", reference, vectors)
        out[name] = {
            "texts_per_second": round(speed, 2),
            "speedup": round(speed / plain_speed, 2),
            "min_cosine": round(float(cosines.min()), 5),
        }
    out["speedup"] = out[backend]["speedup"]
    out["min_cosine"] = out[backend]["min_cosine"]
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="adapt text, defaults (test judgments; trained on the corpus only)")
    for column in (
        "corpus",
        "BM25",
        "dense before",
        "dense after",
        "hybrid before",
        "hybrid after",
        "R@100 before",
        "R@100 after",
        "minutes",
        "served",
    ):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['bm25_ndcg@10']:.4f}",
            f"{r['ndcg@10_before']:.4f}",
            f"{r['ndcg@10_after']:.4f}",
            f"{r['hybrid_ndcg@10_before']:.4f}",
            f"{r['hybrid_ndcg@10_after']:.4f}",
            f"{r['recall@100_before']:.4f}",
            f"{r['recall@100_after']:.4f}",
            f"{r['total_seconds'] / 60:.1f}",
            r["serve_mode"],
        )
    Console(width=200).print(table)  # a log file has no terminal width; keep every column whole


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder of BEIR-layout corpora")
    parser.add_argument("--only", nargs="+", help="run only these corpora (folder names)")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/adapt-corpora-benchmark"))
    parser.add_argument("--resume", action="store_true", help="keep finished stages (debugging only)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "adapt_corpora.json")
    parser.add_argument(
        "--scifact-output",
        type=lambda value: Path(value) if value else None,
        default=ROOT / "benchmarks" / "results" / "adapt_scifact.json",
        help="the SciFact run is also adapt_scifact.py's run (the same defaults, data and split): write "
        "its result there too, with that benchmark's targets (an empty value turns this off)",
    )
    args = parser.parse_args()

    from tasks.core.store import write_json_atomic

    folders = [f for f in beir_folders(args.data) if not args.only or f.name in args.only]
    results: dict[str, dict[str, Any]] = {}
    for folder in folders:
        print(f"--- {folder.name}", flush=True)
        results[folder.name] = run_corpus(folder, args.workspace / folder.name, resume=args.resume)
        write_json_atomic(  # after each corpus: a crash keeps the finished ones
            args.output,
            {"corpora": results, "machine": machine_info()},
        )
        if folder.name == "scifact" and args.scifact_output:
            from benchmarks.adapt_scifact import scifact_result

            write_json_atomic(args.scifact_output, scifact_result(results[folder.name]))
    print_table(results)
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
