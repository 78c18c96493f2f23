"""Running a stage's parts: one after another in this process, or one task per part on a cluster.

A stage that works in stored parts (corpus encoding, query generation, negative mining, labelling,
candidate lists, image decoding) describes each part it has not finished as a *part job*: a small,
picklable callable that computes its slice of the input and writes ``part-NNNNN.parquet`` of the
stage (atomically, under a temporary name). A part job is idempotent: it does nothing when its part
exists, so a part that a crashed worker left unfinished is rerun by the next attempt, and a part
that finished is never recomputed. Two jobs never write the same part: each part index belongs to
exactly one job.

The stage hands its jobs to a :class:`PartRunner`. :class:`LocalParts` runs them here, in order; the
flows' Prefect runner (``flows/engine.py``) submits one Prefect task per job to a Dask cluster.
Stages never import Prefect, so they stay callable from a notebook.

Written by hand because the two libraries each do half: Prefect's task runners run tasks but know
nothing of the store's parts, and the store knows nothing of workers.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

PartJob = Callable[[], Any]

# Documents per part of the corpus embeddings stage: small enough that two workers share a
# 5,000-document corpus evenly (about 40 s a part on one core at 256 tokens).
ENCODE_PART_SIZE = 256


class PartRunner(Protocol):
    """Runs a stage's part jobs to completion (or raises)."""

    distributed: bool

    def run(
        self,
        stage: str,
        jobs: Sequence[PartJob],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]: ...


class LocalParts:
    """Every part in this process, one after another (what a flow does without a cluster)."""

    distributed = False

    def run(
        self,
        stage: str,
        jobs: Sequence[PartJob],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        results = []
        for done, job in enumerate(jobs, start=1):
            results.append(job())
            if progress:
                progress(done, len(jobs))
        return results


LOCAL = LocalParts()


def resumed_progress(
    progress: Callable[[int, int], None] | None, finished: int, total: int
) -> Callable[[int, int], None] | None:
    """A stage's ``(done, total)`` progress over all its parts, for a runner that sees only the parts
    left: says the ``finished`` ones at once, then counts on from them."""
    if progress is None:
        return None
    if finished:
        progress(finished, total)
    return lambda done, _: progress(finished + done, total)


class EngineSettings(BaseModel):
    """Where the per-part stages run: a section of every flow config that has such stages."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task_runner: Literal["local", "dask"] = Field(
        "local",
        description="local: every part in the flow's process; dask: one Prefect task per part of corpus "
        "encoding, query generation, negative mining, labelling, candidate lists and image decoding on "
        "a Dask cluster (the workspace must be on a filesystem every worker mounts at the same path)",
    )
    dask_address: str | None = Field(
        None,
        description="an existing Dask scheduler, e.g. tcp://host:8786 (none with task_runner dask: a "
        "LocalCluster of this machine's cores, one thread each)",
    )
    dask_workers: int | None = Field(
        None, ge=1, description="workers of the LocalCluster (none: one per core); ignored with an address"
    )
    part_retries: int = Field(
        2, ge=0, le=10, description="dask: attempts after the first for a part whose worker failed"
    )


def encode_part_size_field() -> Any:
    """The ``encode_part_size`` setting of the flows that encode a corpus in parts."""
    return Field(
        ENCODE_PART_SIZE,
        ge=1,
        description="documents per part of the corpus embeddings (the unit of crash recovery and of a "
        "worker's task; query generation's is --qgen-part-size)",
    )


# ------------------------------------------------------------------ per-process model caches

_BUILT: dict[Any, Any] = {}
# re-entrant: a build may itself build what it uses (a teacher builds its encoders), in one thread
_BUILT_LOCK = threading.RLock()


def built_once(key: Any, build: Callable[[], Any]) -> Any:
    """``build()`` once per process for ``key``: a worker loads a model for its first part and keeps
    it for the next ones (a part job carries the model's path, never the model)."""
    with _BUILT_LOCK:
        if key not in _BUILT:
            _BUILT[key] = build()
        return _BUILT[key]


# ------------------------------------------------------------------ the shared-workspace check


class EngineError(RuntimeError):
    """The configured cluster cannot run the flow's parts (unreachable, no workers, no shared workspace)."""


class WorkspaceNotShared(EngineError):
    """A worker cannot see or write the flow's workspace at the same path."""


def probe_workspace(workspace: str, marker: str, token: str) -> str:
    """Run on a worker: read the marker the flow wrote into the workspace and write one back.
    Returns "ok" or what is wrong (never raises, so every worker's answer comes back)."""
    path = Path(workspace) / marker
    try:
        seen = path.read_text()
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if seen != token:
        return f"{path} holds another run's marker: this is a different filesystem at the same path"
    reply = path.with_name(f"{path.name}.{os.getpid()}.{os.uname().nodename}")
    try:
        reply.write_text(token)
        reply.unlink()
    except OSError as exc:
        return f"cannot write in {path.parent}: {exc.strerror or exc}"
    return "ok"
