"""The text side's ceiling for the locked-text CLIP path on the fashion validation slice.

The image tower is trained to put each image where the frozen text tower puts the product's
caption. This ranks the validation products by their caption embeddings instead of image
embeddings, with the same queries and judgments as `clip_fashion.py --tune`: what a perfect image
tower would score. Writes benchmarks/results/clip_tune/text_ceiling.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-product-images-small"
    )
    parser.add_argument("--workspace", type=Path, default=ROOT / "adapt-workspace" / "benchmark-clip")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "clip_tune" / "text_ceiling.json"
    )
    args = parser.parse_args()

    from benchmarks.clip_fashion import validation_mask
    from finetune.clip.config import ClipTrainConfig
    from finetune.clip.stage import tower_config
    from tasks.catalog.encoders import cached_text_embeddings, initial_encoder
    from tasks.catalog.evaluation import catalog_eval_set, catalog_metrics_markdown, evaluate_catalog_encoder
    from tasks.catalog.pairs import load_pairs, pairs_stage
    from tasks.core.store import write_json_atomic

    pairs = load_pairs(pairs_stage(args.data / "styles.csv", args.workspace, image_size=(80, 60)))
    eval_set = catalog_eval_set(pairs.subset(validation_mask(pairs.ids)))
    encoder = initial_encoder("all-MiniLM-L6-v2", tower_config(ClipTrainConfig(), (80, 60)), seed=0)
    captions = cached_text_embeddings(encoder, eval_set.captions, args.workspace, show_progress=False)
    report = evaluate_catalog_encoder(
        encoder,
        eval_set,
        system="caption embeddings in place of images",
        workspace=args.workspace,
        image_embeddings=captions,
        show_progress=False,
    )
    print(catalog_metrics_markdown([report]))
    write_json_atomic(
        args.output,
        {
            "attribute_ndcg@10": round(report.metrics["attribute_ndcg@10"], 4),
            "caption_recall@10": round(report.metrics["caption_recall@10"], 4),
            "metrics": {k: round(v, 4) for k, v in report.metrics.items()},
            "mode": "validation slice of the training products (as clip_fashion.py --tune)",
            "products": len(eval_set.doc_ids),
            "attribute_queries": len(eval_set.attribute_queries),
            "note": "each product's image embedding replaced by its caption's text embedding: a perfect image tower",
        },
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
