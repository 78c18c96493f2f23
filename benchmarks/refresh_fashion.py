"""Incremental refresh cost on the fashion catalog: a full run, then a refresh after 1% new and 1% changed.

1. The catalog minus a seeded 1% of its products goes through a full `catalog-refresh` run
   (fresh workspace: queries, negatives, labels, training of both towers, evaluation, index), with
   the flow's default settings (those of the nightly deployment) unless --train-minutes is given.
2. The held-back 1% is added as new products and another 1% is changed (a new product name), and
   the flow runs again: a refresh, which by default adapts the query side only against the catalog
   embeddings of the serving model (see flows/catalog_refresh.py).

Checks: the refresh costs at most 5% of the full run's wall time, the new products are searchable
(each new product's own name finds it in the top 10), and no unchanged product is recomputed
(counted from the store: unchanged products among the refresh's generated queries).
Writes benchmarks/results/refresh_fashion.json (`full_seconds`, `refresh_seconds`,
`recomputed_unchanged`, ...).
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]


def _write(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "fashion-product-images-small"
    )
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/refresh-fashion-benchmark"))
    parser.add_argument("--fraction", type=float, default=0.01, help="share of products added, and changed")
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="training budget of each run (default: the flow's, as the nightly deployment runs it)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N products (smoke runs)")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "refresh_fashion.json"
    )
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from flows.catalog_refresh import RefreshConfig, catalog_refresh_flow
    from tasks.core.store import write_json_atomic
    from tasks.serving.search import Searcher

    shutil.rmtree(args.workspace, ignore_errors=True)
    args.workspace.mkdir(parents=True)
    with (args.data / "styles.csv").open() as handle:
        rows = list(csv.DictReader(handle))[: args.limit]
    for row in rows:
        row["image"] = str((args.data / "images" / row["image"]).resolve())
    rng = random.Random(13)
    count = max(1, int(round(len(rows) * args.fraction)))
    shuffled = rng.sample(range(len(rows)), len(rows))
    new_positions, changed_positions = set(shuffled[:count]), set(shuffled[count : 2 * count])
    base = [r for i, r in enumerate(rows) if i not in new_positions]
    catalog = args.workspace / "styles.csv"
    # the images stay in the data folder, outside the catalog's: the refresh reads them from the image root
    settings = {
        "catalog": str(catalog),
        "workspace": str(args.workspace / "ws"),
        "image_root": str((args.data / "images").resolve()),
    }
    if args.train_minutes is not None:
        settings["train"] = {"time_budget_minutes": args.train_minutes, "max_seq_length": 128}
    config = RefreshConfig.model_validate(settings)

    _write(base, catalog)
    start = time.time()
    full = catalog_refresh_flow(config)
    full_seconds = round(time.time() - start, 1)

    updated = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in changed_positions:
            row["productDisplayName"] = f"{row['productDisplayName']} (new season edition)"
        updated.append(row)
    _write(updated, catalog)
    start = time.time()
    refresh = catalog_refresh_flow(config)
    refresh_seconds = round(time.time() - start, 1)

    searcher = Searcher(config.workspace, config.model_name)
    new_rows = [rows[i] for i in sorted(new_positions)]
    found = sum(
        1 for r in new_rows if r["id"] in {h.doc_id for h in searcher.search(r["productDisplayName"], k=10)}
    )
    indexed = searcher.index.ntotal
    result = {
        "full_seconds": full_seconds,
        "refresh_seconds": refresh_seconds,
        "recomputed_unchanged": refresh["recomputed_unchanged"],
        "refresh_share_of_full": round(refresh_seconds / full_seconds, 4),
        "target_share": 0.05,
        "products": len(rows),
        "changes": refresh["changes"],
        "new_products_found_in_top10": found,
        "new_products": len(new_rows),
        "indexed_products": indexed,
        "unchanged_first_encoded": refresh.get("unchanged_first_encoded"),
        "catalog_texts_encoded_in_refresh": refresh.get("encoded"),
        "refresh_trained_towers": (refresh.get("train") or {}).get("towers"),
        "full": {
            k: full.get(k)
            for k in ("ndcg@10_before", "ndcg@10_after", "promoted", "decision", "train", "stages", "serving")
        },
        "refresh": {
            k: refresh.get(k)
            for k in (
                "ndcg@10_before",
                "ndcg@10_after",
                "promoted",
                "decision",
                "train",
                "stages",
                "serving",
                "queries_generated_for",
            )
        },
        "settings": config.model_dump(mode="json", exclude={"catalog", "workspace", "image_root"}),
        "machine": machine_info(),
    }
    table = Table("run", "seconds", "trained", "nDCG@10 before", "nDCG@10 after", "promoted")
    for name, run, seconds in (("full", full, full_seconds), ("refresh", refresh, refresh_seconds)):
        table.add_row(
            name,
            f"{seconds:.0f}",
            str(run.get("trained")),
            f"{run.get('ndcg@10_before', 0):.4f}",
            f"{run.get('ndcg@10_after', 0):.4f}",
            str(run.get("promoted")),
        )
    Console().print(table)
    print(
        f"refresh/full = {result['refresh_share_of_full']:.1%} (target <= 5%); recomputed unchanged: "
        f"{result['recomputed_unchanged']}; new products found by name: {found}/{len(new_rows)}"
    )
    write_json_atomic(args.output, result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
