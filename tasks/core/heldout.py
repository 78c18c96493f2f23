"""Which items are held out of training: one rule for every flow.

An item (a document, a product) is held out when a salted hash of its id falls below the held-out
fraction. The rule is stable: an item's side never depends on the other items, so it does not move
when the corpus grows or shrinks, and no item is ever both trained on and evaluated on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np


def heldout_mask(ids: Iterable[str], fraction: float, *, salt: str = "holdout") -> np.ndarray:
    """True for the ids held out of training: a salted hash of the id below ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("the held-out fraction must be in [0, 1)")
    values = [
        int.from_bytes(hashlib.sha256(f"{salt}\x1f{i}".encode()).digest()[:8], "big") / 2**64 for i in ids
    ]
    return np.asarray(values, dtype=np.float64) < fraction


def split_heldout_queries(queries: Any, fraction: float, limit: int, *, seed: int, salt: str = "holdout"):
    """(training queries, held-out queries) of a queries table, held out by document.

    A document is held out by :func:`heldout_mask`, so no held-out document is ever trained on and
    the same documents stay held out in every run; at most ``limit`` held-out queries are kept (a
    seeded sample).
    """
    held = queries["doc_id"].isin(
        set(
            np.asarray(queries["doc_id"].unique())[
                heldout_mask(queries["doc_id"].unique(), fraction, salt=salt)
            ]
        )
    )
    heldout, train = queries[held], queries[~held]
    if len(heldout) > limit:
        heldout = heldout.sample(n=limit, random_state=seed)
    return train, heldout
