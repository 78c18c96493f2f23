"""Zero-shot baselines on SciFact (test split): all-MiniLM-L6-v2 and BM25.

Reads ../shared/data/scifact (override with --data), prints a table and writes
benchmarks/results/zero_shot.json with top-level `minilm_ndcg@10` and `bm25_ndcg@10`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "zero_shot.json")
    args = parser.parse_args()

    from rich.console import Console

    from tasks.core.corpus import read_beir
    from tasks.core.evaluation import evaluate_bm25, evaluate_model, rich_table
    from tasks.core.store import write_json_atomic

    start = time.time()
    data = read_beir(args.data, split="test")
    minilm = evaluate_model("all-MiniLM-L6-v2", data, max_seq_length=256)
    bm25 = evaluate_bm25(data, k1=0.9, b=0.4)
    Console().print(
        rich_table([minilm, bm25], title=f"Zero-shot on {args.data.name} (test, {len(data.queries)} queries)")
    )
    result = {
        "minilm_ndcg@10": round(minilm.primary, 4),
        "bm25_ndcg@10": round(bm25.primary, 4),
        "dataset": str(args.data.name),
        "split": "test",
        "queries": len(data.queries),
        "documents": len(data.corpus),
        "minilm": {
            "metrics": minilm.metrics,
            "seconds": minilm.seconds,
            "settings": "title + text, max_seq_length 256, cosine, exact FAISS",
        },
        "bm25": {
            "metrics": bm25.metrics,
            "seconds": bm25.seconds,
            "settings": "bm25s lucene, k1=0.9, b=0.4, English stop words, Snowball stemmer",
        },
        "machine": machine_info(),
        "total_seconds": round(time.time() - start, 1),
    }
    write_json_atomic(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
