"""What stands at rank 1 when the Quora benchmark's relevant question does not, and how far MRR@10 could
rise by ranking only the labelled partner higher.

The retrieval set is `benchmarks/supervised_quora.py`'s (the issue's reading): each duplicate row of
test.tsv is a query, its question1 against all distinct test questions (itself left out), and only
that row's question2 is relevant. For every query the model misses at rank 1, the script sorts the
rank-1 question into one of:

- `labelled_duplicate`: a duplicate of the query by test.tsv's own labels (another partner of the same
  question1, or linked to it through other duplicate rows), judged not relevant for this row;
- `labelled_non_duplicate`: a question test.tsv pairs with the query under label 0;
- `unlabelled`: any other question; the labels say nothing about it.

It also reports the ceiling the labels allow (the rows of one question1 share one ranking, so of
k partners only one can be first: the best any model can reach is sum 1/i over them) and draws a
seeded random sample of `unlabelled` misses into a TSV for reading by hand. A judged copy of that
sample (`--judged`) adds two columns: `top1_is_duplicate` (y or n: would one answer serve both the query
and its rank-1 question?) and `duplicates_above` (how many of the questions ranked above the relevant
one, in the top 10, are such duplicates of the query). From it the script estimates the best MRR@10 a
model could reach without ranking a real duplicate of the query below the labelled partner:
- an `unlabelled` miss at best has the relevant question right after its d duplicates, RR 1/(d + 1)
  (0 when d >= 10), estimated from the sample's mean gain and scaled to all unlabelled misses;
- a `labelled_duplicate` miss at best RR 1/2 (its rank-1 question is a duplicate by test.tsv's own
  labels; generous, there may be more above it);
- a `labelled_non_duplicate` miss at best RR 1.
Every estimate is generous where the reading is unsure (a doubtful question counts as not a duplicate).
The interval is a bootstrap over the judged sample.

Nothing is trained. Writes benchmarks/results/quora_misses.json (and the sample TSV).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.supervised_quora import quora_parser  # noqa: E402
from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEED = 0
SAMPLE_COLUMNS = ["query_id", "rank", "query", "top1", "relevant", "top1_is_duplicate", "duplicates_above"]


def main() -> None:
    parser = quora_parser(__doc__)
    parser.add_argument(
        "--model",
        default="all-MiniLM-L6-v2",
        help="a model name or directory (for another model than the default, also give --output and "
        "--sample-output, or the committed results are overwritten)",
    )
    parser.add_argument("--sample", type=int, default=60, help="unlabelled misses to draw for reading")
    parser.add_argument(
        "--sample-output",
        type=Path,
        default=RESULTS / "quora_misses_sample.tsv",
        help="the drawn misses, with empty judgment columns to fill in by hand",
    )
    parser.add_argument(
        "--judged",
        type=Path,
        default=RESULTS / "quora_misses_judged.tsv",
        help="the sample with top1_is_duplicate (y/n) and duplicates_above (a count) filled in by hand; "
        "used when it exists and holds this run's sample",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "quora_misses.json")
    args = parser.parse_args()

    import numpy as np
    from rich.console import Console

    from finetune.supervised import TrainSettings
    from tasks.core.embeddings import encode_texts
    from tasks.core.evaluation import aggregate, score_run
    from tasks.core.models import load_sentence_transformer
    from tasks.core.store import write_json_atomic, write_text_atomic
    from tasks.labelled.eval_set import build_eval_set
    from tasks.labelled.evaluation import search_eval_set
    from tasks.labelled.readers import read_labelled_pairs
    from tasks.labelled.splits import duplicate_groups

    console = Console()
    start = time.time()
    test = read_labelled_pairs(args.data / "test.tsv")
    eval_set = build_eval_set(test, queries="rows")
    corpus = eval_set.retrieval.corpus
    text_of = dict(zip(corpus.ids, corpus.texts(), strict=True))
    id_of = {text: doc_id for doc_id, text in text_of.items()}

    rows = test.rows
    component = {}  # text id -> duplicate group, through label-1 rows only
    for text1, text2, label, group in zip(
        rows["text1"], rows["text2"], rows["label"], duplicate_groups(test), strict=True
    ):
        if label == 1:
            component[id_of[text1]] = component[id_of[text2]] = int(group)
    non_duplicates: dict[str, set[str]] = {}
    for text1, text2 in rows.loc[rows["label"] == 0, ["text1", "text2"]].itertuples(index=False):
        non_duplicates.setdefault(id_of[text1], set()).add(id_of[text2])
        non_duplicates.setdefault(id_of[text2], set()).add(id_of[text1])

    model = load_sentence_transformer(args.model, max_seq_length=TrainSettings().max_seq_length)
    vectors = encode_texts(model, corpus.texts(), batch_size=128)
    run = search_eval_set(eval_set, vectors, top_k=10)
    qrels = eval_set.retrieval.qrels
    reciprocal = score_run(qrels, run, {"mrr@10": "RR@10"})["mrr@10"]
    mrr = aggregate({"mrr@10": reciprocal})["mrr@10"]

    kinds = ("hit", "labelled_duplicate", "labelled_non_duplicate", "unlabelled")
    by_kind: dict[str, list[str]] = {kind: [] for kind in kinds}
    ranked = {q: sorted(run.get(q, {}), key=lambda doc: -run[q][doc]) for q in qrels}  # best first
    for query in qrels:
        own = eval_set.query_doc(query)
        top = ranked[query][0]
        if top in qrels[query]:
            kind = "hit"
        elif top in component and component.get(top) == component.get(own):
            kind = "labelled_duplicate"
        elif top in non_duplicates.get(own, ()):
            kind = "labelled_non_duplicate"
        else:
            kind = "unlabelled"
        by_kind[kind].append(query)
    n = len(qrels)

    # The labels' ceiling: rows of one question1 share a ranking; with partners seen c_1 >= c_2 >= ...
    # times, the best is to rank them in that order: sum c_j / j over the question1's rows.
    partners: dict[str, dict[str, int]] = {}
    for query, judged in qrels.items():
        counts = partners.setdefault(eval_set.query_doc(query), {})
        for doc in judged:
            counts[doc] = counts.get(doc, 0) + 1
    ceiling = (
        sum(
            sum(c / j for j, c in enumerate(sorted(counts.values(), reverse=True), start=1))
            for counts in partners.values()
        )
        / n
    )

    def gap(queries: list[str]) -> float:
        """MRR@10 gained if each of these queries had its relevant question at rank 1."""
        return sum(1.0 - reciprocal[q] for q in queries) / n

    rng = np.random.default_rng(SEED)
    unlabelled = by_kind["unlabelled"]
    chosen = sorted(rng.choice(len(unlabelled), min(args.sample, len(unlabelled)), replace=False))
    sample = []
    for i in chosen:
        query = unlabelled[i]
        relevant = next(iter(qrels[query]))
        sample.append(
            {
                "query_id": query,
                "rank": 1 + ranked[query].index(relevant) if relevant in ranked[query] else ">10",
                "query": text_of[eval_set.query_doc(query)],
                "top1": text_of[ranked[query][0]],
                "relevant": text_of[relevant],
                "top1_is_duplicate": "",
                "duplicates_above": "",
            }
        )
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, SAMPLE_COLUMNS, delimiter="\t")
    writer.writeheader()
    writer.writerows(sample)
    write_text_atomic(args.sample_output, table.getvalue())

    result = {
        "model": args.model,
        "queries": n,
        "mrr@10": round(mrr, 4),
        "rank1": {kind: len(queries) for kind, queries in by_kind.items()},
        "mrr@10_gap": {kind: round(gap(by_kind[kind]), 4) for kind in kinds[1:]},
        "labels_ceiling_mrr@10": round(ceiling, 4),
        "sample": {"file": shown(args.sample_output), "size": len(sample), "seed": SEED},
        "target_mrr@10": 0.80,
    }
    if args.judged.exists():
        result["judged"] = judged_estimate(args.judged, sample, reciprocal, by_kind, n, mrr, gap)
    result["seconds"] = round(time.time() - start, 1)
    write_json_atomic(args.output, result)
    console.print(result)
    console.print(f"wrote {args.output} and {args.sample_output}")


def shown(path: Path) -> str:
    """A path as the JSON records it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def judged_estimate(path, sample, reciprocal, by_kind, n, mrr, gap) -> dict:
    """The hand-judged sample's share of unlabelled rank-1 questions that are real duplicates, and the
    best MRR@10 reachable without ranking a real duplicate of the query below the labelled partner."""
    import numpy as np
    from scipy.stats import binomtest, bootstrap

    judged, line_of = {}, {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"query_id", "top1_is_duplicate", "duplicates_above"} - set(reader.fieldnames or ())
        if missing:
            raise SystemExit(
                f"{path}:1: the header lacks {sorted(missing)}; expected the columns {SAMPLE_COLUMNS}"
            )
        for row in reader:
            judged[row["query_id"]], line_of[row["query_id"]] = row, reader.line_num
    drawn = [row["query_id"] for row in sample]
    if sorted(judged) != sorted(drawn):
        return {
            "file": shown(path),
            "skipped": "its query ids are not this run's sample (another model, data "
            "or --sample): judge the new sample file and pass it as --judged",
        }
    answers = {q: (judged[q]["top1_is_duplicate"] or "").strip().lower() for q in drawn}
    above = {q: (judged[q]["duplicates_above"] or "").strip() for q in drawn}
    for q in drawn:
        if answers[q] not in ("y", "n") or not above[q].isdigit():
            raise SystemExit(
                f"{path}:{line_of[q]}: expected top1_is_duplicate y or n and duplicates_above a count "
                f"(0-10), found {judged[q]['top1_is_duplicate']!r} and {judged[q]['duplicates_above']!r}"
            )
    duplicates = sum(a == "y" for a in answers.values())
    interval = binomtest(duplicates, len(drawn)).proportion_ci(method="wilson")
    # Per judged miss: what moving its relevant question up to just below the query's real duplicates
    # would add. Its mean, scaled to all unlabelled misses, is their reachable gain.
    best = {q: 1.0 / (int(a) + 1) if int(a) < 10 else 0.0 for q, a in above.items()}
    values = np.array([max(best[q], reciprocal[q]) - reciprocal[q] for q in drawn])
    scale = len(by_kind["unlabelled"]) / n
    gain = float(values.mean()) * scale
    ci = bootstrap((values,), np.mean, confidence_level=0.95, random_state=SEED).confidence_interval
    base = (
        mrr
        + gap(by_kind["labelled_non_duplicate"])
        + sum(max(0.5 - reciprocal[q], 0.0) for q in by_kind["labelled_duplicate"]) / n
    )
    return {
        "file": shown(path),
        "judged": len(drawn),
        "top1_is_duplicate": duplicates,
        "share_top1_duplicate": round(duplicates / len(drawn), 3),
        "share_top1_duplicate_95ci": [round(float(interval.low), 3), round(float(interval.high), 3)],
        "mean_duplicates_above_relevant": round(float(np.mean([int(a) for a in above.values()])), 2),
        "mrr@10_gain_unlabelled": round(gain, 4),
        "mrr@10_gain_labelled": round(base - mrr, 4),
        "best_mrr@10_without_demoting_real_duplicates": round(base + gain, 4),
        "best_mrr@10_95ci": [round(float(base + ci.low * scale), 4), round(float(base + ci.high * scale), 4)],
    }


if __name__ == "__main__":
    main()
