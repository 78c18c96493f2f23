"""Catalog image/text adaptation on the fashion catalog: the offline (locked MiniLM text) path.

Reads ../shared/data/fashion-product-images-small (override with --data): 14,999 products with a
60x80 photo and text fields. Products are split by id (a salted hash, so the split is the same on
every machine and every run): 12% held out (~1,800 products, never trained on), the rest trained
on. The bundled all-MiniLM-L6-v2 is the frozen text tower; a small image tower is trained from
scratch into its embedding space on the training products' (image, caption) pairs. Evaluation on
the held-out products: caption -> image Recall@1/5/10 and MRR, attribute queries
("{gender} {baseColour} {articleType}", every product with those values relevant) nDCG@10, and
image -> image by articleType P@10; before (untrained image tower: near random) and after.

Settings were chosen on a validation slice carved from the training products (`--tune`: trains on
the training products minus that slice and evaluates on the slice; the held-out products are not
touched). Writes benchmarks/results/clip_fashion.json (top-level `attribute_ndcg@10`,
`caption_recall@10`, `train_seconds`) and a PNG grid of top images before/after for a few queries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
FASHION_DATA = ROOT.parent / "shared" / "data" / "fashion-product-images-small"
HELDOUT_FRACTION = 0.12
VALIDATION_FRACTION = 0.12  # of the training products, for choosing settings (--tune)
SHOWCASE = ["navy blue men shirt", "women red handbag", "black sports shoes for men", "white watch"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=FASHION_DATA)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "clip_fashion.json")
    parser.add_argument(
        "--workspace",
        type=Path,
        default=ROOT / "adapt-workspace" / "benchmark-clip",
        help="caches (pairs, text vectors) and training checkpoints",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose settings: train without the validation slice and evaluate on it (the held-out "
        "products are not used); writes <output stem>_tune.json",
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        default=0,
        metavar="N",
        help="with --tune: train on only the first N training products (quick comparisons)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override training settings (ClipTrainConfig fields), for --tune runs",
    )
    args = parser.parse_args()

    import numpy as np
    import torch
    from rich.console import Console

    from finetune.clip.config import ClipTrainConfig
    from finetune.clip.stage import caption_views, tower_config, train_catalog_encoder
    from tasks.catalog.encoders import cached_text_embeddings, initial_encoder, load_catalog_encoder
    from tasks.catalog.evaluation import catalog_eval_set, catalog_metrics_markdown, evaluate_catalog_encoder
    from tasks.catalog.pairs import load_pairs, pairs_stage
    from tasks.catalog.report import grid_rows, image_grid_png, pick_showcase_queries, search_texts
    from tasks.core.heldout import heldout_mask
    from tasks.core.store import stage_key, write_json_atomic

    console = Console()
    load_start = os.getloadavg()
    started = time.time()
    overrides = dict(item.split("=", 1) for item in args.set)
    config = ClipTrainConfig.model_validate({k: _parse(v) for k, v in overrides.items()})

    ref = pairs_stage(args.data / "styles.csv", args.workspace, image_size=(80, 60))
    pairs = load_pairs(ref)
    held_out = heldout_mask(pairs.ids, HELDOUT_FRACTION, salt="holdout")
    if args.tune:
        validation = validation_mask(pairs.ids)
        train, evaluation = pairs.subset(~held_out & ~validation), pairs.subset(validation)
        if args.train_subset:
            train = train.subset(np.arange(len(train)) < args.train_subset)
    else:
        train, evaluation = pairs.subset(~held_out), pairs.subset(held_out)
    assert not set(train.ids) & set(evaluation.ids)
    console.print(
        f"{len(pairs)} products ({len(pairs.bad)} left out, {ref.converted} converted to RGB): "
        f"{len(train)} trained on, {len(evaluation)} {'validation' if args.tune else 'held out'}"
    )

    encoder = initial_encoder("all-MiniLM-L6-v2", tower_config(config, (80, 60)), seed=config.seed)
    encode_start = time.time()
    for view in caption_views(train, config.extra_caption_templates):  # cached: training finds them stored
        cached_text_embeddings(encoder, view, args.workspace)
    encode_seconds = time.time() - encode_start
    eval_set = catalog_eval_set(evaluation)
    before = evaluate_catalog_encoder(
        encoder, eval_set, system="untrained image tower", workspace=args.workspace
    )
    before_images = encoder.encode_images(eval_set.pixels)

    run_key = stage_key("benchmark-clip", config, inputs=[train.key])
    model_dir = args.workspace / "models" / run_key
    saved, train_result = train_catalog_encoder(
        "all-MiniLM-L6-v2",
        train,
        config,
        model_dir,
        image_size=(80, 60),
        workspace=args.workspace,
        run_key=run_key,
        checkpoint_dir=args.workspace / "checkpoints" / run_key,
    )
    encoder = load_catalog_encoder(saved)  # evaluate the model as saved, loaded back
    after = evaluate_catalog_encoder(
        encoder, eval_set, system="trained (locked MiniLM text)", workspace=args.workspace
    )
    after_images = encoder.encode_images(eval_set.pixels)
    load_end = os.getloadavg()

    console.print(catalog_metrics_markdown([before, after]))
    console.print(
        f"training: {train_result.seconds / 60:.1f} min, {train_result.epochs_done} epochs, "
        f"{train_result.seconds_per_epoch:.0f} s/epoch, {train_result.images_per_second:.0f} images/s; "
        f"load average {load_start} -> {load_end}"
    )

    stem = args.output.stem + ("_tune" if args.tune else "")
    output = args.output.with_name(stem + ".json")
    grid_path = output.with_name(stem + "_grid.png")
    picked = pick_showcase_queries(eval_set, before, after, n=3)
    queries = {q: eval_set.attribute_queries[q] for q in picked}
    before_hits = {q: before.attribute.top_hits[q] for q in picked}
    after_hits = {q: after.attribute.top_hits[q] for q in picked}
    free = encoder.encode_text(SHOWCASE)
    for i, (b, a) in enumerate(
        zip(
            search_texts(free, before_images, eval_set.doc_ids, 5),
            search_texts(free, after_images, eval_set.doc_ids, 5),
            strict=True,
        )
    ):
        queries[f"free-{i}"], before_hits[f"free-{i}"], after_hits[f"free-{i}"] = SHOWCASE[i], b, a
    rows = grid_rows(eval_set, queries, before_hits, after_hits, qrels=eval_set.attribute_qrels)
    image_grid_png(
        rows, grid_path, title=f"fashion catalog, {len(evaluation)} held-out products: top 5 images"
    )

    after_metrics = after.metrics
    result = {
        "attribute_ndcg@10": round(after_metrics["attribute_ndcg@10"], 4),
        "caption_recall@10": round(after_metrics["caption_recall@10"], 4),
        "train_seconds": train_result.seconds,
        "caption_recall@1": round(after_metrics["caption_recall@1"], 4),
        "caption_recall@5": round(after_metrics["caption_recall@5"], 4),
        "caption_mrr": round(after_metrics["caption_mrr"], 4),
        "image_precision@10": round(after_metrics["image_precision@10"], 4),
        "train_minutes": round(train_result.seconds / 60, 2),
        "train_cpu_seconds": train_result.cpu_seconds,
        "seconds_per_epoch": train_result.seconds_per_epoch,
        "images_per_second": train_result.images_per_second,
        "epochs": train_result.epochs_done,
        "epochs_asked": config.epochs,
        "epochs_planned": train_result.epochs_planned,
        "replans": train_result.replans,
        "stopped_by_budget": train_result.stopped_by_budget,
        "final_temperature": train_result.final_temperature,
        "loss_by_epoch": [round(x, 4) for x in train_result.loss_by_epoch()],
        "mode": "tune (validation slice of the training products)" if args.tune else "held-out products",
        "dataset": args.data.name,
        "products": {
            "usable": len(pairs),
            "left_out": len(pairs.bad),
            "converted_to_rgb": ref.converted,
            "trained_on": len(train),
            "evaluated_on": len(evaluation),
        },
        "split": {
            "by": "sha256 of salt + product id",
            "holdout_fraction": HELDOUT_FRACTION,
            "validation_fraction": VALIDATION_FRACTION if args.tune else None,
        },
        "queries": {
            "caption": len(eval_set.caption_qrels),
            "attribute": len(eval_set.attribute_queries),
            "attribute_template": "{gender} {baseColour} {articleType}",
            "image": len(eval_set.image_qrels),
        },
        "before": {
            "system": before.system,
            "metrics": {k: round(v, 4) for k, v in before.metrics.items()},
            "note": "untrained (randomly initialised, seeded) image tower: near random by construction",
        },
        "after": {"system": after.system, "metrics": {k: round(v, 4) for k, v in after.metrics.items()}},
        "settings": config.model_dump(mode="json"),
        "text_tower": "all-MiniLM-L6-v2 (bundled, frozen, max_seq_length 64)",
        "image_tower": tower_config(config, (80, 60)).to_dict(),
        "model_dir": str(saved),
        "caption_encoding_seconds": round(encode_seconds, 1),
        "grid": str(grid_path.relative_to(ROOT)) if grid_path.is_relative_to(ROOT) else str(grid_path),
        "machine": {
            **machine_info(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
        },
        "total_seconds": round(time.time() - started, 1),
        "seed": config.seed,
        "numpy": np.__version__,
    }
    write_json_atomic(output, result)
    console.print(f"wrote {output} and {grid_path}")


def validation_mask(ids):
    """The validation slice that chooses settings: a salted-hash share of the products that are not held out."""
    from tasks.core.heldout import heldout_mask

    return ~heldout_mask(ids, HELDOUT_FRACTION, salt="holdout") & heldout_mask(
        ids, VALIDATION_FRACTION, salt="validation"
    )


def _parse(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


if __name__ == "__main__":
    main()
