"""Why zero-shot all-MiniLM-L6-v2 scores MRR@10 0.787 on our Quora retrieval set, not the 0.752 the
issue measured: the same model under two readings of "query with question1 among all distinct test
questions, question2 relevant".

- `distinct_texts` (what `adapt supervised` reports for pairs): the corpus is every distinct question text of
  test.tsv; each distinct question1 of a duplicate pair is a query (itself left out) and all its
  question2 partners are relevant.
- `question_slots`: the corpus is every question *slot* of test.tsv (20,000: a text that occurs in
  several rows is several documents); each duplicate row's question1 is a query, only its own slot
  left out, only that row's question2 slot relevant. A query whose text occurs in another row then
  finds its own copy first, which is not relevant.

Nothing is trained: `--model` may name saved models (e.g. those benchmarks/supervised_quora.py
trained) to score them under each reading too. Writes benchmarks/results/quora_protocols.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
MEASURES = {"mrr@10": "RR@10", "ndcg@10": "nDCG@10"}
PROTOCOLS = {
    "distinct_texts": "build_eval_set's default: distinct texts; each distinct question1 a query, all its "
    "question2 partners relevant",
    "question_slots": "every question slot a document; each duplicate row's question1 a query, only its own "
    "slot left out, only that row's question2 slot relevant",
    "rows_over_distinct_texts": "distinct texts; each duplicate row a query, only that row's question2 relevant",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "quora-question-pairs")
    parser.add_argument(
        "--model",
        action="append",
        metavar="[LABEL=]MODEL",
        help="a model name or directory, optionally labelled; repeatable (default: all-MiniLM-L6-v2)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "quora_protocols.json")
    args = parser.parse_args()

    from rich.console import Console

    from finetune.supervised import TrainSettings
    from tasks.corpus import read_labelled_pairs
    from tasks.evaluate import encode_texts
    from tasks.models import load_sentence_transformer
    from tasks.store import write_json_atomic

    console = Console()
    start = time.time()
    rows = read_labelled_pairs(args.data / "test.tsv").rows.reset_index(drop=True)
    distinct = sorted(set(rows["text1"]) | set(rows["text2"]))
    duplicates = rows[rows["label"] == 1]
    occurrences = pd_counts(rows)
    repeated = sum(1 for t in set(duplicates["text1"]) if occurrences[t] > 1)

    scores = {}
    for label, name in (m.split("=", 1) if "=" in m else (m, m) for m in args.model or ["all-MiniLM-L6-v2"]):
        model = load_sentence_transformer(name, max_seq_length=TrainSettings().max_seq_length)
        vectors = encode_texts(model, distinct, batch_size=128)
        scores[label] = {"model": str(name), **score(vectors, distinct, rows, duplicates)}
        console.print(label, scores[label])
    result = {
        "protocols": PROTOCOLS,
        "models": scores,
        "question1_texts_in_more_than_one_slot": repeated,
        "issue_zero_shot": {"mrr@10": 0.752, "ndcg@10": 0.794},
        "seconds": round(time.time() - start, 1),
    }
    write_json_atomic(args.output, result)
    console.print(f"wrote {args.output}")


def pd_counts(rows):
    """How many question slots of the file hold each text."""
    from collections import Counter

    return Counter(rows["text1"]) + Counter(rows["text2"])


def score(vectors, distinct, rows, duplicates) -> dict:
    """MRR@10 and nDCG@10 of one model's vectors of the distinct texts, under each protocol."""
    from tasks.evaluate import aggregate, exact_index, score_run, search_index

    row_of = {text: i for i, text in enumerate(distinct)}
    ids = [f"t{i}" for i in range(len(distinct))]
    index = exact_index(vectors)
    out = {}

    qrels: dict[str, dict[str, int]] = {}
    for text1, text2 in duplicates[["text1", "text2"]].itertuples(index=False):
        if text1 != text2:
            qrels.setdefault(f"t{row_of[text1]}", {})[f"t{row_of[text2]}"] = 1
    queries = list(qrels)
    run = search_index(index, ids, queries, vectors[[int(q[1:]) for q in queries]], top_k=10,
                       exclude={q: {q} for q in queries})
    out["distinct_texts"] = (qrels, run, len(ids))

    # a slot's vector is its text's vector
    slot_ids, slot_rows = [], []
    for r, (text1, text2) in enumerate(rows[["text1", "text2"]].itertuples(index=False)):
        slot_ids += [f"r{r}q1", f"r{r}q2"]
        slot_rows += [row_of[text1], row_of[text2]]
    qrels = {f"r{r}q1": {f"r{r}q2": 1} for r in duplicates.index}
    run = search_index(exact_index(vectors[slot_rows]), slot_ids, list(qrels),
                       vectors[[row_of[t] for t in duplicates["text1"]]], top_k=10,
                       exclude={q: {q} for q in qrels})
    out["question_slots"] = (qrels, run, len(slot_ids))

    qrels, exclude, query_rows = {}, {}, []
    for r, text1, text2 in zip(duplicates.index, duplicates["text1"], duplicates["text2"], strict=True):
        if text1 != text2:
            qrels[f"r{r}"] = {f"t{row_of[text2]}": 1}
            exclude[f"r{r}"] = {f"t{row_of[text1]}"}
            query_rows.append(row_of[text1])
    run = search_index(index, ids, list(qrels), vectors[query_rows], top_k=10, exclude=exclude)
    out["rows_over_distinct_texts"] = (qrels, run, len(ids))

    return {
        protocol: {"queries": len(qrels), "corpus": n_docs,
                   **{k: round(v, 4) for k, v in aggregate(score_run(qrels, run, MEASURES)).items()}}
        for protocol, (qrels, run, n_docs) in out.items()
    }


if __name__ == "__main__":
    main()
