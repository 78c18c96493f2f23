"""The catalog refresh's delta logic: what changed since the last run, and what to train on.

A refresh keeps a state file per model (``<workspace>/refresh/<model>/state.json``): the snapshot of
the last finished run (product id -> content hash), the query/label stages of every earlier run with
the products each covered, and how many products were added or changed since each document encoder
was trained. From it and the catalog of today:

* :func:`diff_snapshot`: new / changed / removed / unchanged products, by content hash;
* :func:`live_training_data`: each live product's queries and labels from the latest stage that
  covered it (an older stage's label whose negative has changed since, or is gone, is stale);
* :func:`replay_labels`: the new labels plus a seeded sample of earlier ones (``replay_ratio`` per
  new query), so the model does not forget the products that did not change;
* :func:`choose_towers`: train the query side only while the serving document encoder is an
  adapted one and less than ``full_retrain_share`` of the catalog has changed since it was trained;
* :func:`refresh_lock`: one refresh of a model at a time.

The state is written last by the flow (:meth:`RefreshState.save`), so a crash leaves the previous
one and the next run redoes the same delta from the store.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core.store import Store, file_lock, write_json_atomic

STATE_FILE = "state.json"
log = logging.getLogger(__name__)


class RefreshLockedError(RuntimeError):
    """Another refresh of the same model is running."""


@contextlib.contextmanager
def refresh_lock(folder: Path, timeout: float) -> Iterator[None]:
    """One refresh of a model at a time: a second one says that it waits, waits up to ``timeout`` s,
    then fails cleanly."""
    path = folder / ".refresh.lock"

    def held() -> RefreshLockedError:
        return RefreshLockedError(
            f"another refresh holds {path} (waited {timeout:.0f} s); try again when it finishes"
        )

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path, 0, held))
        except RefreshLockedError:
            if timeout <= 0:
                raise
            log.warning("another refresh of this model holds %s: waiting up to %g s for it", path, timeout)
            stack.enter_context(file_lock(path, timeout, held))
            log.info("the other refresh has finished: this one starts")
        yield


@dataclass
class RefreshState:
    """What the last finished refresh of a model left (see the module docstring)."""

    snapshot: dict[str, str] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0
    catalog_key: str | None = None
    changed_since: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> RefreshState:
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(
            snapshot=data.get("snapshot", {}),
            stages=data.get("stages", []),
            runs=data.get("runs", 0),
            catalog_key=data.get("catalog_key"),
            changed_since=data.get("changed_since", {}),
        )

    def save(self, folder: Path) -> None:
        write_json_atomic(
            Path(folder) / STATE_FILE,
            {
                "snapshot": self.snapshot,
                "stages": self.stages,
                "runs": self.runs,
                "catalog_key": self.catalog_key,
                "changed_since": self.changed_since,
            },
        )


def diff_snapshot(previous: dict[str, str], docs: pd.DataFrame) -> dict[str, list[str]]:
    """new / changed / removed / unchanged product ids against the last snapshot (id -> content hash)."""
    now = dict(zip(docs["doc_id"], docs["content_hash"], strict=True))
    return {
        "new": sorted(d for d in now if d not in previous),
        "changed": sorted(d for d in now if d in previous and previous[d] != now[d]),
        "removed": sorted(d for d in previous if d not in now),
        "unchanged": sorted(d for d in now if previous.get(d) == now[d]),
    }


def live_training_data(
    store: Store, stages: list[dict[str, Any]], live_ids: set[str], changed: set[str]
) -> tuple[pd.DataFrame, list[tuple[int, pd.DataFrame]]]:
    """(queries of live products, [(stage number, its valid labels)]), each product's from the latest
    stage that covered it; labels of an older stage whose negative changed since, or is gone, are dropped."""
    owner: dict[str, int] = {}
    for number, stage in enumerate(stages):
        for doc in stage["docs"]:
            owner[doc] = number
    all_queries, all_labels = [], []
    for number, stage in enumerate(stages):
        frame = store.read_pandas("queries", stage["queries"])
        frame = frame[frame["doc_id"].map(lambda d, n=number: d in live_ids and owner.get(d) == n)]
        all_queries.append(frame)
        if stage["labels"]:
            labels = store.read_pandas("labels", stage["labels"])
            stale = changed if number < len(stages) - 1 else set()
            labels = labels[
                labels["query_id"].isin(set(frame["query_id"]))
                & ~labels["neg_id"].isin(stale)
                & labels["neg_id"].isin(live_ids)
            ]
            all_labels.append((number, labels))
    queries = (
        pd.concat(all_queries, ignore_index=True)
        if all_queries
        else pd.DataFrame(columns=["query_id", "doc_id", "text", "source"])
    )
    return queries, all_labels


def replay_labels(all_labels: list[tuple[int, pd.DataFrame]], replay_ratio: float, seed: int) -> pd.DataFrame:
    """The last stage's labels plus a seeded sample of earlier stages' queries (``replay_ratio`` per new query)."""
    new_labels = all_labels[-1][1]
    old = [labels for _, labels in all_labels[:-1]]
    replay = pd.concat(old, ignore_index=True) if old else new_labels.iloc[:0]
    wanted = int(round(replay_ratio * new_labels["query_id"].nunique()))
    if len(replay) and wanted:
        keep = (
            replay["query_id"]
            .drop_duplicates()
            .sample(n=min(wanted, replay["query_id"].nunique()), random_state=seed)
        )
        replay = replay[replay["query_id"].isin(set(keep))]
    else:
        replay = replay.iloc[:0]
    return pd.concat([new_labels, replay], ignore_index=True)


def choose_towers(
    refresh_towers: str,
    serving_card: dict[str, Any],
    changed_since_full: int,
    full_retrain_share: float,
    catalog_size: int,
) -> str:
    """'query' while an adapted document encoder serves and the catalog has not drifted far from it, else 'both'."""
    if (
        refresh_towers == "query"
        and serving_card.get("labels_key")
        and changed_since_full < full_retrain_share * catalog_size
    ):
        return "query"
    return "both"


def index_is_current(index_dir: Path, catalog_key: str) -> bool:
    """Whether the search index in ``index_dir`` was built from the catalog with this content key."""
    meta = index_dir / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("corpus_key") == catalog_key
