"""Where a flow's per-part stages run: here, or one Prefect task per part on a Dask cluster.

:func:`part_runner` turns a flow's :class:`tasks.core.parts.EngineSettings` into the part runner its
stages take. With ``task_runner: dask`` it opens Prefect's ``DaskTaskRunner`` (prefect-dask) on the
cluster at ``dask_address``, or on a ``LocalCluster`` of this machine's cores, checks that every
worker sees the workspace at the same path (before any work), and submits each part job as a Prefect
task with retries: a worker that dies mid-part loses that part only; Dask reschedules it and Prefect
retries it, and the job, finding no part file, computes it again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.core.parts import (
    LOCAL,
    EngineError,
    EngineSettings,
    PartRunner,
    WorkspaceNotShared,
    probe_workspace,
)


@task(name="stage-part", cache_policy=NO_CACHE, persist_result=False)
def run_part_task(job: Any) -> Any:
    """One part of a stage (a :mod:`tasks.core.parts` part job): computes and writes it, or finds it done."""
    return job()


class DaskParts:
    """Submits each part job as a Prefect task to an open ``DaskTaskRunner``."""

    distributed = True

    def __init__(self, runner: Any, retries: int, logger: Any):
        self.runner, self.retries, self.logger = runner, retries, logger

    def run(
        self,
        stage: str,
        jobs: Sequence[Any],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Any]:
        from prefect.futures import as_completed

        if not jobs:
            return []
        part = run_part_task.with_options(
            task_run_name=f"{stage} part {{job.index}}", retries=self.retries, retry_delay_seconds=2
        )
        self.logger.info("%s: %d parts to %s", stage, len(jobs), self.runner.client.scheduler.address)
        futures = [self.runner.submit(part, parameters={"job": job}) for job in jobs]
        for done, _ in enumerate(as_completed(futures), start=1):
            if progress:
                progress(done, len(jobs))
        return [future.result() for future in futures]


@contextlib.contextmanager
def part_runner(settings: EngineSettings, workspace: str | Path) -> Iterator[PartRunner]:
    """The part runner of a flow run: :data:`tasks.core.parts.LOCAL`, or a Dask cluster's (opened
    here, closed on exit; a ``LocalCluster`` is started and stopped with the run)."""
    if settings.task_runner == "local":
        yield LOCAL
        return
    from prefect_dask import DaskTaskRunner

    logger = get_run_logger()
    if settings.dask_address:
        runner = DaskTaskRunner(address=settings.dask_address)
        where = settings.dask_address
    else:
        from prefect.client.orchestration import get_client

        workers = settings.dask_workers or os.cpu_count() or 1
        with get_client(sync_client=True) as client:  # the workers report their task runs there too
            api = str(client.api_url)
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "env": {"PREFECT_API_URL": api},
            }
        )
        where = f"a LocalCluster of {workers} workers"
    with runner:
        try:
            client = runner.client  # connects (or starts the LocalCluster) here
        except (OSError, TimeoutError) as exc:
            raise EngineError(
                f"cannot use the Dask cluster at {where}: {exc}; start its scheduler and workers, or run "
                "with task_runner local"
            ) from exc
        logger.info("dask: %s (%d workers)", where, len(client.scheduler_info()["workers"]))
        check_shared_workspace(client, Path(workspace))
        yield DaskParts(runner, settings.part_retries, logger)


def check_shared_workspace(client: Any, workspace: Path) -> None:
    """Every worker must read and write ``workspace`` at the same path, or parts written there would
    be lost or split between filesystems: refuse at the start, naming each worker that cannot."""
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    marker = workspace / f".dask-probe-{token}"
    marker.write_text(token)
    try:
        answers = client.run(probe_workspace, str(workspace), marker.name, token)
    finally:
        marker.unlink(missing_ok=True)
    if not answers:
        raise WorkspaceNotShared("the Dask cluster has no workers")
    wrong = {worker: answer for worker, answer in answers.items() if answer != "ok"}
    if wrong:
        lines = "; ".join(f"{worker}: {answer}" for worker, answer in sorted(wrong.items()))
        raise WorkspaceNotShared(
            f"the workspace {workspace} is not shared with {len(wrong)} of {len(answers)} Dask workers "
            f"({lines}). Put the workspace on a filesystem every worker mounts at this same path "
            "(NFS, a cluster filesystem), or run with task_runner local"
        )
