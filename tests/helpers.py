"""Small builders shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.corpus import read_beir


def write_beir_subset(source: Path, target: Path, n_queries: int, n_docs: int) -> Path:
    """A BEIR folder with the first n_queries judged queries, their documents, and others up to n_docs."""
    data = read_beir(source)
    queries = data.queries.head(n_queries)
    wanted = {d for q in queries["query_id"] for d in data.qrels[q]}
    docs = data.corpus.docs
    keep = docs[docs["doc_id"].isin(wanted)]
    fill = docs[~docs["doc_id"].isin(wanted)].head(max(0, n_docs - len(keep)))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with (target / "corpus.jsonl").open("w") as handle:
        for row in docs[docs["doc_id"].isin(set(keep["doc_id"]) | set(fill["doc_id"]))].itertuples():
            handle.write(json.dumps({"_id": row.doc_id, "title": row.title, "text": row.text}) + "\n")
    with (target / "queries.jsonl").open("w") as handle:
        for row in queries.itertuples():
            handle.write(json.dumps({"_id": row.query_id, "text": row.text}) + "\n")
    with (target / "qrels" / "test.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for q in queries["query_id"]:
            for d, g in data.qrels[q].items():
                handle.write(f"{q}\t{d}\t{g}\n")
    return target
