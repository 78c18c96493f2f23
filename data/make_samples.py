"""Rebuild the small samples under data/ from the full sets in ../shared/data (deterministic).

    python data/make_samples.py [--shared ../shared/data]

scifact-sample: 200 SciFact *train* claims (never the 300 test claims, so benchmarks stay clean),
the abstracts they cite, and other abstracts up to 800 in all; BEIR layout.
fashion-sample: 400 products of the fashion catalog with their images (a few grayscale ones kept).
quora-sample: 1,000 labelled pairs from dev.tsv (train.tsv) and 1,000 from test.tsv (test.tsv).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scifact(shared: Path, out: Path, n_queries: int = 200, n_docs: int = 800) -> None:
    rng = random.Random(13)
    src = shared / "scifact"
    qrels = {}
    with (src / "qrels" / "train.tsv").open() as handle:
        next(handle)
        for line in handle:
            q, d, s = line.rstrip("\n").split("\t")
            qrels.setdefault(q, {})[d] = int(s)
    chosen = sorted(rng.sample(sorted(qrels), n_queries), key=int)
    wanted = {d for q in chosen for d in qrels[q]}
    docs = [json.loads(line) for line in (src / "corpus.jsonl").open()]
    others = [d["_id"] for d in docs if d["_id"] not in wanted]
    wanted |= set(rng.sample(others, n_docs - len(wanted)))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as handle:
        for doc in docs:
            if doc["_id"] in wanted:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    queries = {json.loads(line)["_id"]: json.loads(line) for line in (src / "queries.jsonl").open()}
    with (out / "queries.jsonl").open("w") as handle:
        for q in chosen:
            handle.write(json.dumps(queries[q], ensure_ascii=False) + "\n")
    with (out / "qrels" / "test.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for q in chosen:
            for d, s in qrels[q].items():
                handle.write(f"{q}\t{d}\t{s}\n")


def fashion(shared: Path, out: Path, n_products: int = 400) -> None:
    rng = random.Random(7)
    src = shared / "fashion-product-images-small"
    with (src / "styles.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        header, rows = reader.fieldnames, list(reader)
    chosen = sorted(rng.sample(range(len(rows)), n_products))
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "styles.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for i in chosen:
            writer.writerow(rows[i])
            shutil.copyfile(src / "images" / rows[i]["image"], out / "images" / rows[i]["image"])


def quora(shared: Path, out: Path, n_pairs: int = 1000) -> None:
    src = shared / "quora-question-pairs"
    out.mkdir(parents=True, exist_ok=True)
    for name, target, seed in (("dev.tsv", "train.tsv", 3), ("test.tsv", "test.tsv", 4)):
        lines = (src / name).read_text(encoding="utf-8").split("\n")
        header, body = lines[0], [line for line in lines[1:] if line]
        chosen = sorted(random.Random(seed).sample(range(len(body)), n_pairs))
        (out / target).write_text("\n".join([header] + [body[i] for i in chosen]) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    scifact(args.shared, HERE / "scifact-sample")
    fashion(args.shared, HERE / "fashion-sample")
    quora(args.shared, HERE / "quora-sample")


if __name__ == "__main__":
    main()
