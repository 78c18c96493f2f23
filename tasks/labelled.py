"""Labelled data for supervised fine-tuning: splits, evaluation sets, and their evaluation.

* ``split_no_shared_text``: carve an evaluation split off the training data so that no text is in
  both (rows that share a text, directly or through other rows, stay on the same side);
* ``build_eval_set``: a retrieval set (every eval query against an index of all eval texts, the
  query itself left out; judged by ir-measures through ``tasks.evaluate``) and a pair
  classification set (accuracy, F1 and average precision of the cosine score at the best
  threshold, computed with sentence-transformers' ``BinaryClassificationEvaluator``);
* ``evaluate_labelled``: both, from one encoding of the eval texts, as a ``LabelledReport``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.corpus import CORPUS_COLUMNS, BeirData, Corpus, DataError, LabelledData, content_hash
from tasks.evaluate import EvalReport, encode_texts, exact_index, report_from_run, search_index

log = logging.getLogger(__name__)

PAIR_METRICS = ("accuracy", "F1", "AP")
_TEXT_COLUMNS = {
    "pairs": ("text1", "text2"),
    "groups": ("text",),
    "triplets": ("query", "positive", "negative"),
}


# ----------------------------------------------------------------------------------- components


def row_components(data: LabelledData) -> np.ndarray:
    """A component id per row: rows that share a text (or, for groups, a label) get the same id,
    also through chains of other rows. This is what keeps a split free of shared text."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows = data.rows
    n = len(rows)
    node_of: dict[tuple[str, str], int] = {}
    edge_rows: list[int] = []
    edge_nodes: list[int] = []
    columns = [("text", c) for c in _TEXT_COLUMNS[data.kind]] + (
        [("label", "label")] if data.kind == "groups" else []
    )
    for space, column in columns:
        for row, value in enumerate(rows[column].tolist()):
            if value is None:
                continue
            node = node_of.setdefault((space, str(value)), n + len(node_of))
            edge_rows.append(row)
            edge_nodes.append(node)
    size = n + len(node_of)
    graph = coo_matrix((np.ones(len(edge_rows), dtype=np.int8), (edge_rows, edge_nodes)), shape=(size, size))
    _, labels = connected_components(graph, directed=False)
    return labels[:n]


def duplicate_groups(data: LabelledData) -> np.ndarray:
    """A group id per row: rows whose texts are duplicates of each other (directly or through
    other rows) share it. Pairs: connected through label-1 pairs only; groups: the label;
    triplets: connected through (query, positive). Used to keep duplicates apart in a batch."""
    if data.kind == "groups":
        return pd.factorize(data.rows["label"])[0]
    if data.kind == "pairs":
        positive = data.rows["label"].to_numpy() == 1
        linked = LabelledData("pairs", data.rows[positive], data.source)
        ids = np.full(len(data.rows), -1, dtype=np.int64)
        ids[positive] = row_components(linked)
        # a label-0 row is its own group, unless its first text is in a duplicate group
        first = dict(zip(linked.rows["text1"], ids[positive], strict=True))
        first.update(zip(linked.rows["text2"], ids[positive], strict=True))
        next_id = int(ids.max()) + 1 if positive.any() else 0
        for row in np.flatnonzero(~positive):
            text = data.rows["text1"].iat[row]
            if text in first:
                ids[row] = first[text]
            else:
                ids[row] = next_id
                next_id += 1
        return ids
    linked = LabelledData("triplets", data.rows.assign(negative=None), data.source)
    return row_components(linked)


def split_no_shared_text(
    data: LabelledData, fraction: float, *, seed: int = 0
) -> tuple[LabelledData, LabelledData]:
    """(train, eval): about ``fraction`` of the rows for eval, with no text on both sides."""
    if not 0 < fraction < 1:
        raise ValueError("the evaluation fraction must be between 0 and 1")
    components = row_components(data)
    ids, sizes = np.unique(components, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    target = fraction * len(data)
    chosen: list[int] = []
    taken = 0
    for position in order:
        if taken + sizes[position] <= target:
            chosen.append(int(ids[position]))
            taken += int(sizes[position])
    in_eval = np.isin(components, chosen)
    if not in_eval.any() or in_eval.all():
        raise DataError(
            data.source,
            None,
            (
                f"cannot carve an evaluation split of {fraction:.0%} with no text shared with training: the "
                f"{len(data)} rows form {len(ids)} group(s) of connected texts, the largest with {sizes.max()} "
                "rows; give an evaluation file instead"
            ),
        )
    train, evaluation = data.subset(~in_eval), data.subset(in_eval)
    if not _has_retrieval_queries(evaluation):
        raise DataError(
            data.source,
            None,
            "the carved evaluation split has no duplicate pairs to query with; "
            "give an evaluation file or a larger evaluation fraction",
        )
    return train, evaluation


def shared_texts(first: LabelledData, second: LabelledData) -> set[str]:
    """Texts that occur in both data sets (leakage between a training and an evaluation file)."""
    return set(first.texts()) & set(second.texts())


def _has_retrieval_queries(data: LabelledData) -> bool:
    if data.kind == "pairs":
        return bool((data.rows["label"] == 1).any())
    if data.kind == "groups":
        return bool((data.rows["label"].value_counts() >= 2).any())
    return len(data) > 0


# ------------------------------------------------------------------------------------------ views
# Every layout can feed every loss: these turn one layout into the rows another loss needs.


def _members(data: LabelledData) -> list[list[str]]:
    """Distinct texts of each group with two or more of them."""
    members = data.rows.groupby("label", sort=False)["text"].apply(lambda s: list(dict.fromkeys(s)))
    return [m for m in members if len(m) >= 2]


def labelled_pairs(data: LabelledData, *, seed: int = 0) -> pd.DataFrame:
    """``text1, text2, label`` (0/1) rows.

    Pairs: as given. Groups: each member with the next one (cyclically) as duplicates, and as many
    random pairs from different groups as non-duplicates. Triplets: (query, positive) as
    duplicates; (query, negative), or (query, a random positive of an unrelated row), as not.
    """
    rng = np.random.default_rng(seed)
    if data.kind == "pairs":
        return data.rows[["text1", "text2", "label"]].reset_index(drop=True)
    if data.kind == "groups":
        positives = [
            (g[i], g[(i + 1) % len(g)]) for g in _members(data) for i in range(len(g) if len(g) > 2 else 1)
        ]
        texts = data.rows["text"].tolist()
        labels = data.rows["label"].tolist()
        negatives: list[tuple[str, str]] = []
        for _ in range(len(positives) * 20):  # bounded: data with one group has no negatives to find
            if len(negatives) == len(positives):
                break
            a, b = rng.choice(len(texts), 2, replace=False)
            if labels[a] != labels[b] and texts[a] != texts[b]:
                negatives.append((texts[a], texts[b]))
        records = [(a, b, 1) for a, b in positives] + [(a, b, 0) for a, b in negatives]
        return pd.DataFrame(records, columns=["text1", "text2", "label"])
    rows = data.rows
    groups = duplicate_groups(data)
    records = []
    for row, (query, positive, negative) in enumerate(
        rows[["query", "positive", "negative"]].itertuples(index=False)
    ):
        records.append((query, positive, 1))
        if negative is not None:
            records.append((query, negative, 0))
        elif len(rows) > 1:
            other = int(rng.integers(len(rows)))
            if groups[other] != groups[row]:
                records.append((query, rows["positive"].iat[other], 0))
    return pd.DataFrame(records, columns=["text1", "text2", "label"])


def positive_pairs(data: LabelledData) -> pd.DataFrame:
    """``anchor, positive[, negative], group`` rows for in-batch-negative losses (MNRL).

    ``group`` names the duplicate group of the row (see ``duplicate_groups``): two rows of one
    group must not share a batch, or each would be the other's false negative.
    Pairs: the label-1 pairs. Groups: each member with the next one, cyclically. Triplets: as given.
    """
    if data.kind == "pairs":
        groups = duplicate_groups(data)
        positive = (data.rows["label"] == 1).to_numpy()
        table = data.rows.loc[positive, ["text1", "text2"]].rename(
            columns={"text1": "anchor", "text2": "positive"}
        )
        table["group"] = groups[positive]
    elif data.kind == "groups":
        records = []
        for number, group in enumerate(_members(data)):
            records.extend(
                (group[i], group[(i + 1) % len(group)], number)
                for i in range(len(group) if len(group) > 2 else 1)
            )
        table = pd.DataFrame(records, columns=["anchor", "positive", "group"])
    else:
        table = data.rows[["query", "positive", "negative"]].rename(columns={"query": "anchor"})
        if table["negative"].isna().any():
            table = table.drop(columns="negative")
        table["group"] = duplicate_groups(data)
    table["group"] = "\x1fgroup " + table["group"].astype(str)  # cannot be mistaken for a text
    return table.reset_index(drop=True)


def text_groups(data: LabelledData) -> pd.DataFrame:
    """``text, label`` (int) rows for batch-hard triplet losses: each distinct text once, with the
    id of its duplicate group (pairs and triplets: connected through duplicates)."""
    if data.kind == "groups":
        table = data.rows[["text", "label"]].drop_duplicates()
        table = table.assign(label=pd.factorize(table["label"])[0])
        return table.reset_index(drop=True)
    groups = duplicate_groups(data)
    if data.kind == "pairs":
        positive = (data.rows["label"] == 1).to_numpy()
        columns = ["text1", "text2"]
    else:
        positive = np.ones(len(data.rows), dtype=bool)
        columns = ["query", "positive"]
    label_of: dict[str, int] = {}
    for column in columns:
        for text, group in zip(data.rows.loc[positive, column], groups[positive], strict=True):
            label_of.setdefault(text, int(group))
    table = pd.DataFrame({"text": list(label_of), "label": list(label_of.values())})
    return table.reset_index(drop=True)


# ------------------------------------------------------------------------------- evaluation sets


@dataclass
class EvalSet:
    """What a model is evaluated on: retrieval over all eval texts, and labelled pairs."""

    retrieval: BeirData
    exclude: dict[str, set[str]]  # query id -> its own text's id: a query never retrieves its own text
    pairs: pd.DataFrame  # text1, text2, label (0/1)
    source: str
    # query id -> id of the corpus text that is the query (None: query ids are corpus text ids)
    query_docs: dict[str, str] | None = None

    def query_doc(self, query_id: str) -> str:
        return self.query_docs[query_id] if self.query_docs else query_id

    @property
    def summary(self) -> str:
        positives = int(self.pairs["label"].sum())
        return (
            f"{len(self.retrieval.queries)} queries over {len(self.retrieval.corpus)} texts; "
            f"{len(self.pairs)} pairs ({positives} duplicates)"
        )


def _text_id(text: str) -> str:
    return "t" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def build_eval_set(data: LabelledData, *, seed: int = 0, queries: str = "texts") -> EvalSet:
    """The retrieval and pair-classification sets of labelled evaluation data.

    Retrieval: the corpus is every distinct text. Pairs: each first text of a duplicate pair is a
    query and its duplicates are relevant. Groups: each text of a group of two or more is a query,
    the rest of its group relevant. Triplets: each query, its positives relevant.
    ``queries="rows"`` (pairs only): each duplicate row is a query of its own, with only that row's
    second text relevant (a first text with several partners is then several queries, each judging
    the other partners not relevant; the reading the Quora issue's zero-shot numbers were measured
    with).
    Pair classification: the rows of ``labelled_pairs``.
    """
    if queries not in ("texts", "rows"):
        raise ValueError(f"queries must be 'texts' or 'rows', not {queries!r}")
    if queries == "rows" and data.kind != "pairs":
        raise ValueError(f"queries='rows' needs labelled pairs; {data.source} holds {data.kind}")
    texts = data.texts()
    ids = {t: _text_id(t) for t in texts}
    docs = pd.DataFrame(
        {
            "doc_id": [ids[t] for t in texts],
            "title": "",
            "text": texts,
            "image": None,
            "content_hash": [content_hash("", t) for t in texts],
            "attributes": None,
        },
        columns=CORPUS_COLUMNS,
    )
    corpus = Corpus(docs=docs, source=data.source)
    qrels: dict[str, dict[str, int]] = {}
    query_docs: dict[str, str] | None = None  # rows: query id -> id of its own text
    rows = data.rows

    def judge(query: str, relevant: str) -> None:
        if query != relevant:
            qrels.setdefault(ids[query], {})[ids[relevant]] = 1

    if data.kind == "pairs" and queries == "rows":
        query_docs = {}
        duplicates = rows.loc[rows["label"] == 1, ["text1", "text2"]]
        for row, (text1, text2) in zip(duplicates.index, duplicates.itertuples(index=False), strict=True):
            if text1 != text2:
                qrels[f"row{row}"] = {ids[text2]: 1}
                query_docs[f"row{row}"] = ids[text1]
    elif data.kind == "pairs":
        for text1, text2 in rows.loc[rows["label"] == 1, ["text1", "text2"]].itertuples(index=False):
            judge(text1, text2)
    elif data.kind == "groups":
        for group in _members(data):
            for query in group:
                for other in group:
                    judge(query, other)
    else:
        for query, positive in rows[["query", "positive"]].itertuples(index=False):
            judge(query, positive)
    if not qrels:
        raise DataError(
            data.source,
            None,
            "no duplicates to evaluate retrieval with; expected at least one "
            "pair labelled 1, one group of two texts, or one (query, positive) row",
        )
    text_of = dict(zip(docs["doc_id"], docs["text"], strict=True))
    own = query_docs or {q: q for q in qrels}  # query id -> id of its own text
    table = pd.DataFrame({"query_id": list(qrels), "text": [text_of[own[q]] for q in qrels]})
    retrieval = BeirData(corpus=corpus, queries=table, qrels=qrels, folder=data.source, split="eval")
    return EvalSet(
        retrieval=retrieval,
        exclude={q: {own[q]} for q in qrels},
        pairs=labelled_pairs(data, seed=seed),
        source=data.source,
        query_docs=query_docs,
    )


# ------------------------------------------------------------------------------------ evaluating


@dataclass
class LabelledReport:
    """Retrieval and pair-classification metrics of one model on one evaluation set."""

    system: str
    retrieval: EvalReport
    classification: dict[str, float]  # accuracy, F1, AP (+ thresholds, precision, recall)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        """All headline metrics in one mapping: the retrieval set's, then pair accuracy, F1, AP."""
        return {**self.retrieval.metrics, **{f"pair {m}": self.classification[m] for m in PAIR_METRICS}}

    def metric(self, name: str) -> float:
        metrics = self.metrics
        if name not in metrics:
            raise KeyError(f"unknown metric {name!r}; known: {', '.join(metrics)}")
        return metrics[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "retrieval": self.retrieval.to_dict(),
            "classification": self.classification,
            "seconds": self.seconds,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelledReport:
        return cls(
            system=data["system"],
            retrieval=EvalReport.from_dict(data["retrieval"]),
            classification=dict(data["classification"]),
            seconds=data.get("seconds", 0.0),
            extra=dict(data.get("extra", {})),
        )

    def save(self, path: str | Path) -> Path:
        from tasks.store import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LabelledReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def classification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 and AP of a similarity score at its best thresholds (sentence-transformers'
    BinaryClassificationEvaluator's own threshold search, on scores we already have)."""
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:  # e.g. (query, positive) rows only: nothing to tell apart
        log.warning("pair classification needs duplicate and non-duplicate pairs; reporting NaN")
        nan = float("nan")
        return {
            "accuracy": nan,
            "F1": nan,
            "AP": nan,
            "accuracy_threshold": nan,
            "f1_threshold": nan,
            "precision": nan,
            "recall": nan,
            "pairs": int(len(labels)),
        }
    accuracy, accuracy_threshold = BinaryClassificationEvaluator.find_best_acc_and_threshold(
        scores, labels, True
    )
    f1, precision, recall, f1_threshold = BinaryClassificationEvaluator.find_best_f1_and_threshold(
        scores, labels, True
    )
    return {
        "accuracy": float(accuracy),
        "F1": float(f1),
        "AP": float(average_precision_score(labels, scores)),
        "accuracy_threshold": float(accuracy_threshold),
        "f1_threshold": float(f1_threshold),
        "precision": float(precision),
        "recall": float(recall),
        "pairs": int(len(labels)),
    }


def search_eval_set(eval_set: EvalSet, embeddings: np.ndarray, *, top_k: int = 100) -> dict[str, dict[str, float]]:
    """The retrieval run of an eval set: each query (its own text's row of ``embeddings``, which are
    the corpus texts' unit vectors in corpus order) against all corpus texts, its own text left out."""
    corpus = eval_set.retrieval.corpus
    position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    queries = eval_set.retrieval.queries["query_id"].tolist()
    return search_index(
        exact_index(embeddings),
        corpus.ids,
        queries,
        embeddings[[position[eval_set.query_doc(q)] for q in queries]],
        top_k=top_k,
        exclude=eval_set.exclude,
    )


def evaluate_labelled(
    model: Any,
    eval_set: EvalSet,
    *,
    system: str | None = None,
    top_k: int = 100,
    batch_size: int = 64,
    max_seq_length: int | None = 128,
    show_progress: bool = True,
) -> LabelledReport:
    """Retrieval and pair-classification metrics of a model (a name, a directory, or loaded)."""
    from tasks.models import load_sentence_transformer

    start = time.time()
    name = system or (str(model) if isinstance(model, (str, Path)) else "model")
    encoder = (
        load_sentence_transformer(model, max_seq_length=max_seq_length)
        if isinstance(model, (str, Path))
        else model
    )
    corpus = eval_set.retrieval.corpus
    embeddings = encode_texts(
        encoder,
        corpus.texts(),
        batch_size=batch_size,
        show_progress=show_progress,
        desc="encoding evaluation texts",
    )
    run = search_eval_set(eval_set, embeddings, top_k=top_k)
    retrieval = report_from_run(name, eval_set.retrieval, run, seconds=time.time() - start)
    position = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    row_of_text = {
        text: position[doc_id] for doc_id, text in zip(corpus.ids, corpus.docs["text"], strict=True)
    }
    left = embeddings[[row_of_text[t] for t in eval_set.pairs["text1"]]]
    right = embeddings[[row_of_text[t] for t in eval_set.pairs["text2"]]]
    scores = np.sum(left * right, axis=1)
    classification = classification_metrics(scores, eval_set.pairs["label"].to_numpy())
    return LabelledReport(
        system=name, retrieval=retrieval, classification=classification, seconds=round(time.time() - start, 2)
    )


# -------------------------------------------------------------------------------------- reports


def labelled_markdown(
    before: LabelledReport,
    after: LabelledReport,
    eval_set: EvalSet,
    *,
    metrics: Sequence[str] = ("nDCG@10", "MRR@10", "MAP@100", "Recall@10", "Hit@10"),
    n_examples: int = 6,
) -> str:
    """Before/after table (retrieval, then pair classification) and example matches."""
    from tasks.report import before_after_markdown, example_matches, examples_markdown

    lines = ["| pair classification | before | after | change |", "|---|---:|---:|---:|"]
    for metric in PAIR_METRICS:
        b, a = before.classification[metric], after.classification[metric]
        how = "average precision" if metric == "AP" else "at the best threshold"
        lines.append(f"| {metric} ({how}) | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    texts = dict(zip(eval_set.retrieval.corpus.ids, eval_set.retrieval.corpus.docs["text"], strict=True))
    query_table = eval_set.retrieval.queries
    examples = example_matches(
        before.retrieval,
        after.retrieval,
        dict(zip(query_table["query_id"], query_table["text"], strict=True)),
        texts,
        eval_set.retrieval.qrels,
        n=n_examples,
        metric="MRR@10",
    )
    return "\n\n".join(
        [
            f"Evaluation set: {eval_set.summary}.",
            "**Retrieval** (each query against all evaluation texts, itself left out)",
            before_after_markdown(before.retrieval, after.retrieval, metrics),
            "**Pair classification** (cosine similarity)",
            "\n".join(lines),
            "**Example matches** (top 3 before and after; ✅ a labelled duplicate)",
            examples_markdown(examples),
        ]
    )


# ------------------------------------------------------------------------------------ preparing


@dataclass(frozen=True)
class PreparedData:
    """Where the train / eval (/ validation) rows of a supervised run are stored, and a summary.

    Small enough to pass between Prefect tasks; the rows themselves are Parquet files.
    """

    kind: str
    key: str
    paths: dict[str, str]  # split name -> parquet file
    rows: dict[str, int]
    eval_source: str  # the evaluation file, or "carved from <train file>"
    shared_texts: int  # texts in both the training and a given evaluation file (leakage)

    def load(self, split: str) -> LabelledData:
        """The rows of a split; ``"train+validation"`` joins splits."""
        table = pd.concat([pd.read_parquet(self.paths[name]) for name in split.split("+")], ignore_index=True)
        if self.kind == "triplets":
            table["negative"] = table["negative"].astype(object).where(table["negative"].notna(), None)
        return LabelledData(
            self.kind, table, source=f"{Path(self.paths[split.split('+')[0]]).parent} ({split})"
        )


def prepare_labelled(
    train: str | Path,
    workspace: str | Path,
    *,
    eval_file: str | Path | None = None,
    layout: str = "auto",
    eval_fraction: float = 0.2,
    validation_fraction: float | None = None,
    seed: int = 0,
) -> PreparedData:
    """Read the labelled files, carve the splits, and store them under a content key.

    eval: the given file, or ``eval_fraction`` of the training rows with no text shared.
    validation (when ``validation_fraction`` is given): carved from what is left for training the
    same way; a hyper-parameter search scores its trials on it, never on eval.
    """
    from tasks.corpus import read_labelled
    from tasks.store import Store, stage_key

    data = read_labelled(train, layout)
    given = read_labelled(eval_file, layout) if eval_file else None
    if given is not None and given.kind != data.kind:
        raise DataError(
            eval_file,
            None,
            f"the evaluation file holds {given.kind}, the training file {data.kind}; "
            "expected the same layout",
        )
    config = {
        "layout": data.kind,
        "eval_fraction": None if given else eval_fraction,
        "validation_fraction": validation_fraction,
        "seed": seed,
    }
    key = stage_key("labelled", config, inputs=[data.key, given.key if given else ""])
    store = Store(workspace)
    if store.is_complete("labelled", key):
        manifest = store.manifest("labelled", key)
        return PreparedData(**manifest["prepared"])
    if given is not None:
        training, evaluation = data, given
        shared = len(shared_texts(data, given))
        if shared:
            log.warning(
                "%d texts are in both %s and %s: evaluation results will look better than they are",
                shared,
                train,
                eval_file,
            )
    else:
        training, evaluation = split_no_shared_text(data, eval_fraction, seed=seed)
        shared = 0
    splits = {"train": training, "eval": evaluation}
    if validation_fraction:
        splits["train"], splits["validation"] = split_no_shared_text(
            training, validation_fraction, seed=seed + 1
        )
    import pyarrow as pa

    writer = store.open("labelled", key, config=config, inputs=[data.key, given.key if given else ""])
    paths = {}
    for name, split in splits.items():
        paths[name] = str(
            writer.write_file(
                f"{name}.parquet", lambda tmp, split=split: split.rows.to_parquet(tmp, index=False)
            )
        )
    prepared = PreparedData(
        kind=data.kind,
        key=key,
        paths=paths,
        rows={n: len(s) for n, s in splits.items()},
        eval_source=str(eval_file) if eval_file else f"carved from {train}",
        shared_texts=shared,
    )
    schema = pa.schema([("split", pa.string()), ("rows", pa.int64())])
    writer.write_part(
        0, pa.table({"split": list(splits), "rows": [len(s) for s in splits.values()]}, schema=schema)
    )
    writer.commit(prepared=asdict(prepared))
    return prepared


def evaluate_prepared(
    model: str | Path,
    prepared: PreparedData,
    output: str | Path,
    *,
    split: str = "eval",
    system: str | None = None,
    batch_size: int = 64,
    max_seq_length: int | None = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a model on a stored split; the full report goes to ``output`` (JSON), the
    headline metrics are returned."""
    eval_set = build_eval_set(prepared.load(split), seed=seed)
    report = evaluate_labelled(
        str(model),
        eval_set,
        system=system or str(model),
        batch_size=batch_size,
        max_seq_length=max_seq_length,
    )
    report.save(output)
    return {
        "report": str(output),
        "metrics": report.metrics,
        "seconds": report.seconds,
        "summary": eval_set.summary,
    }


# ---------------------------------------------------------------------------------- Prefect tasks

from prefect import task  # noqa: E402

prepare_labelled_task = task(prepare_labelled, name="prepare-labelled")
evaluate_prepared_task = task(evaluate_prepared, name="evaluate-labelled", task_run_name="evaluate {system}")
