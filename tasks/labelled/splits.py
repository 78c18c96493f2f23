"""Labelled data prepared for training: splits with no shared text, and the training views.

* :func:`split_no_shared_text`: carve an evaluation (or validation) split off the training data so
  that no text is in both (rows that share a text, directly or through other rows, stay on the
  same side);
* :func:`labelled_pairs`, :func:`positive_pairs`, :func:`text_groups`: the rows each loss reads;
* :func:`prepare_labelled`: train / validation / eval splits written to the store once, so a
  rerun, a search trial or an evaluation reads them back instead of splitting again.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.core.corpus import DataError
from tasks.labelled.readers import LabelledData

log = logging.getLogger(__name__)


_TEXT_COLUMNS = {
    "pairs": ("text1", "text2"),
    "groups": ("text",),
    "triplets": ("query", "positive", "negative"),
}


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


def group_members(data: LabelledData) -> list[list[str]]:
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
            (g[i], g[(i + 1) % len(g)])
            for g in group_members(data)
            for i in range(len(g) if len(g) > 2 else 1)
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
        for number, group in enumerate(group_members(data)):
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
    from tasks.core.store import Store, stage_key
    from tasks.labelled.readers import read_labelled

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
