"""Which attribute the trained image tower gets wrong: per-field agreement of the top 10 images.

For the model of the last `benchmarks/clip_fashion.py` run (its `model_dir`, or --model) on the same
held-out products: each attribute query "{gender} {baseColour} {articleType}" is searched as in the
benchmark, and for its top 10 images the share that match the query's gender, colour and article
type is counted field by field (a hit is relevant only when all three match). nDCG@10 is also split
by how many held-out products are relevant to the query (a query with one relevant product among
1,844 is harder than one with fifty). Reads nothing the benchmark did not; trains nothing.
Writes benchmarks/results/clip_attribute_errors.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clip_fashion import FASHION_DATA, HELDOUT_FRACTION  # noqa: E402
from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("gender", "baseColour", "articleType")
BUCKETS = ((1, 1), (2, 4), (5, 19), (20, 10**9))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=FASHION_DATA)
    parser.add_argument(
        "--benchmark", type=Path, default=ROOT / "benchmarks" / "results" / "clip_fashion.json"
    )
    parser.add_argument(
        "--model", type=Path, help="a saved catalog encoder (default: the benchmark's model_dir)"
    )
    parser.add_argument("--workspace", type=Path, default=ROOT / "adapt-workspace" / "benchmark-clip")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "clip_attribute_errors.json"
    )
    args = parser.parse_args()

    import numpy as np
    from rich.console import Console

    from tasks.catalog.encoders import cached_text_embeddings, load_catalog_encoder
    from tasks.catalog.evaluation import catalog_eval_set
    from tasks.catalog.pairs import load_pairs, pairs_stage
    from tasks.core.evaluation import score_run
    from tasks.core.heldout import heldout_mask
    from tasks.core.index import exact_index, search_index
    from tasks.core.store import write_json_atomic

    console = Console()
    benchmark = json.loads(args.benchmark.read_text())
    model_dir = args.model or Path(benchmark["model_dir"])
    pairs = load_pairs(pairs_stage(args.data / "styles.csv", args.workspace, image_size=(80, 60)))
    held_out = pairs.subset(heldout_mask(pairs.ids, HELDOUT_FRACTION, salt="holdout"))
    eval_set = catalog_eval_set(held_out)
    fields_of = dict(zip(eval_set.doc_ids, held_out.attributes(), strict=True))

    def mean(per_query: dict[str, float]) -> float:
        return round(float(np.mean(list(per_query.values()))), 4) if per_query else 0.0

    def value(doc_id: str, field: str) -> str:
        return (fields_of[doc_id].get(field) or "").strip()

    encoder = load_catalog_encoder(model_dir)
    query_ids = list(eval_set.attribute_queries)
    query_vectors = cached_text_embeddings(
        encoder, [eval_set.attribute_queries[q] for q in query_ids], args.workspace
    )
    systems = {
        "images (trained tower)": encoder.encode_images(eval_set.pixels),
        # the text ceiling: each product ranked by its own caption's embedding
        "captions (perfect image tower)": cached_text_embeddings(encoder, eval_set.captions, args.workspace),
    }
    result: dict = {
        "model_dir": str(model_dir),
        "held_out_products": len(eval_set.doc_ids),
        "attribute_queries": len(query_ids),
        "systems": {},
    }
    for system, vectors in systems.items():
        run = search_index(exact_index(vectors), eval_set.doc_ids, query_ids, query_vectors, top_k=10)
        per_query = score_run(eval_set.attribute_qrels, run, {"ndcg@10": "nDCG@10"})["ndcg@10"]
        agreement = {}
        for field in FIELDS:
            shares = []
            for query in query_ids:
                wanted = value(next(iter(eval_set.attribute_qrels[query])), field)
                hits = list(run[query])
                shares.append(np.mean([value(h, field) == wanted for h in hits]) if hits else 0.0)
            agreement[field] = round(float(np.mean(shares)), 4)
        all_three = float(
            np.mean([np.mean([h in eval_set.attribute_qrels[q] for h in run[q]]) for q in query_ids])
        )
        buckets = {}
        for low, high in BUCKETS:
            chosen = {q: v for q, v in per_query.items() if low <= len(eval_set.attribute_qrels[q]) <= high}
            label = f"{low}" if low == high else (f"{low}-{high}" if high < 10**9 else f"{low}+")
            buckets[label] = {"queries": len(chosen), "ndcg@10": mean(chosen)}
        result["systems"][system] = {
            "attribute_ndcg@10": mean(per_query),
            "top10_share_matching": {**agreement, "all three": round(all_three, 4)},
            "ndcg@10_by_relevant_products": buckets,
        }
        console.print(system, result["systems"][system])
    write_json_atomic(args.output, result)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
