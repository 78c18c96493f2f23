"""Why zero-shot all-MiniLM-L6-v2 scored MRR@10 0.787 on our first Quora retrieval set, not the 0.752 the
issue measured: the same model under three readings of "query with question1 among all distinct test
questions, question2 relevant".

- `distinct_texts` (what `adapt supervised` reports for pairs): the corpus is every distinct question text of
  test.tsv; each distinct question1 of a duplicate pair is a query (itself left out) and all its
  question2 partners are relevant.
- `question_slots`: the corpus is every question *slot* of test.tsv (20,000: a text that occurs in
  several rows is several documents); each duplicate row's question1 is a query, only its own slot
  left out, only that row's question2 slot relevant. A query whose text occurs in another row then
  finds its own copy first, which is not relevant.
- `rows_over_distinct_texts` (benchmarks/supervised_quora.py): the corpus of `distinct_texts`; each
  duplicate row is a query of its own (its own text left out), only that row's question2 relevant.

Nothing is trained: `--model` may name saved models (e.g. those benchmarks/supervised_quora.py
trained) to score them under each reading too. Writes benchmarks/results/quora_protocols.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.supervised_quora import quora_parser  # noqa: E402
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
    parser = quora_parser(__doc__)
    parser.add_argument(
        "--model",
        action="append",
        metavar="[LABEL=]MODEL",
        help="a model name or directory, optionally labelled; repeatable (default: all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "quora_protocols.json"
    )
    args = parser.parse_args()

    from rich.console import Console

    from finetune.supervised import TrainSettings
    from tasks.core.embeddings import encode_texts
    from tasks.core.evaluation import aggregate, score_run
    from tasks.core.models import load_sentence_transformer
    from tasks.core.store import write_json_atomic
    from tasks.labelled.eval_set import build_eval_set
    from tasks.labelled.evaluation import search_eval_set
    from tasks.labelled.readers import read_labelled_pairs

    console = Console()
    start = time.time()
    test = read_labelled_pairs(args.data / "test.tsv")
    rows = test.rows.reset_index(drop=True)
    eval_sets = {  # the two readings over distinct texts, as tasks.labelled.eval_set builds them
        "distinct_texts": build_eval_set(test),
        "rows_over_distinct_texts": build_eval_set(test, queries="rows"),
    }
    corpus = eval_sets["distinct_texts"].retrieval.corpus  # the same distinct texts in both
    distinct = corpus.docs["text"].tolist()
    duplicates = rows[rows["label"] == 1]
    occurrences = slot_counts(rows)
    repeated = sum(1 for t in set(duplicates["text1"]) if occurrences[t] > 1)

    scores = {}
    for label, name in (m.split("=", 1) if "=" in m else (m, m) for m in args.model or ["all-MiniLM-L6-v2"]):
        model = load_sentence_transformer(name, max_seq_length=TrainSettings().max_seq_length)
        vectors = encode_texts(model, corpus.texts(), batch_size=128)
        scores[label] = {"model": str(name)}
        for protocol in PROTOCOLS:
            if protocol in eval_sets:
                qrels, n_docs = eval_sets[protocol].retrieval.qrels, len(distinct)
                run = search_eval_set(eval_sets[protocol], vectors, top_k=10)
            else:
                qrels, run, n_docs = slot_run(vectors, distinct, rows, duplicates)
            metrics = aggregate(score_run(qrels, run, MEASURES))
            scores[label][protocol] = {
                "queries": len(qrels),
                "corpus": n_docs,
                **{k: round(v, 4) for k, v in metrics.items()},
            }
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


def slot_counts(rows):
    """How many question slots of the file hold each text."""
    from collections import Counter

    return Counter(rows["text1"]) + Counter(rows["text2"])


def slot_run(vectors, distinct, rows, duplicates):
    """qrels, run and corpus size of the `question_slots` reading, which tasks.labelled.eval_set does not build
    (it indexes each distinct text once): every slot is a document, its vector its text's vector."""
    from tasks.core.index import exact_index, search_index

    row_of = {text: i for i, text in enumerate(distinct)}
    slot_ids, slot_rows = [], []
    for r, (text1, text2) in enumerate(rows[["text1", "text2"]].itertuples(index=False)):
        slot_ids += [f"r{r}q1", f"r{r}q2"]
        slot_rows += [row_of[text1], row_of[text2]]
    qrels = {f"r{r}q1": {f"r{r}q2": 1} for r in duplicates.index}
    run = search_index(
        exact_index(vectors[slot_rows]),
        slot_ids,
        list(qrels),
        vectors[[row_of[t] for t in duplicates["text1"]]],
        top_k=10,
        exclude={q: {q} for q in qrels},
    )
    return qrels, run, len(slot_ids)


if __name__ == "__main__":
    main()
