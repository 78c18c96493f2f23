"""Scale-out: the same flow on a Dask cluster, and training on several processes."""

from __future__ import annotations

import numpy as np
import pytest

from flows.cli import main
from tasks.core.store import Store

from helpers import write_beir_subset

STAGES_IN_PARTS = ("embeddings", "queries")


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory, scifact_sample):
    return write_beir_subset(scifact_sample, tmp_path_factory.mktemp("beir"), n_queries=12, n_docs=60)


def _text_args(corpus, workspace, model, *extra):
    return [
        "text",
        "--corpus",
        str(corpus),
        "--eval",
        str(corpus),
        "--workspace",
        str(workspace),
        "--base-model",
        str(model),
        "--listwise-max-steps",
        "3",
        "--listwise-batch-size",
        "4",
        "--listwise-max-seq-length",
        "48",
        "--lists-top",
        "8",
        "--lists-sampled",
        "4",
        "--mine-max-seq-length",
        "64",
        "--eval-max-seq-length",
        "64",
        "--encode-part-size",
        "8",
        "--qgen-part-size",
        "8",
        *extra,
    ]


def _assert_same_stages(local: Store, other: Store) -> None:
    """Every stage of ``local`` has the same keys in ``other`` and the same rows: ids and texts exactly,
    embeddings to float rounding (a worker computes with one thread, the flow with two)."""
    stages = sorted(p.name for p in local.workspace.iterdir() if local.keys(p.name))
    assert set(STAGES_IN_PARTS) <= set(stages)
    for stage in stages:
        keys = local.keys(stage)
        assert sorted(other.keys(stage)) == sorted(keys), stage
        for key in keys:
            mine, theirs = local.read(stage, key), other.read(stage, key)
            assert mine.schema == theirs.schema and mine.num_rows == theirs.num_rows, stage
            for name in mine.column_names:
                a, b = mine.column(name).to_pylist(), theirs.column(name).to_pylist()
                if name == "embedding":
                    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
                else:
                    assert a == b, (stage, name)
            assert local.manifest(stage, key)["parts"] == other.manifest(stage, key)["parts"]


@pytest.mark.slow
def test_adapt_text_on_a_dask_cluster_equals_the_local_run_even_when_a_worker_dies(
    prefect_harness, tmp_path, small_beir, tiny_bi_encoder, capsys
):
    """Two worker processes; the worker that starts the third part task dies on the spot. The run
    still finishes, and every stage (keys, parts and rows) equals the one-process run's."""
    from dask_faults import KillWorkerOnce
    from distributed import Client, LocalCluster

    local = tmp_path / "local"
    assert main(_text_args(small_beir, local, tiny_bi_encoder)) == 0

    faults = tmp_path / "faults"
    faults.mkdir()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(KillWorkerOnce(str(faults), at=3))
        pids_before = set(client.run(lambda: __import__("os").getpid()).values())
        distributed = tmp_path / "dask"
        code = main(
            _text_args(
                small_beir,
                distributed,
                tiny_bi_encoder,
                "--task-runner",
                "dask",
                "--dask-address",
                cluster.scheduler_address,
            )
        )
        assert code == 0
        killed_pid = int((faults / "killed").read_text().split()[0])
        assert killed_pid in pids_before  # one of the two workers died mid-stage...
        client.wait_for_workers(2, timeout=60)  # ...and its nanny started a new one
    # 60 documents in parts of 8: 8 encoding parts and 8 query parts, each started at least once,
    # the killed one twice
    started = len(list(faults.glob("started-*")))
    assert started >= 16 + 1
    _assert_same_stages(Store(local), Store(distributed))
    report_local = sorted((local / "reports").glob("adapt-text-*.json"))
    report_dask = sorted((distributed / "reports").glob("adapt-text-*.json"))
    assert len(report_local) == len(report_dask) == 1


def test_a_workspace_workers_cannot_see_is_refused_before_any_work(tmp_path):
    """The start-up check names every worker whose answer is wrong and what to do; nothing is written."""
    from flows.engine import check_shared_workspace
    from tasks.core.parts import WorkspaceNotShared, probe_workspace

    class Cluster:  # answers as Client.run does: {worker address: the function's result}
        def __init__(self, answers):
            self.answers = answers

        def run(self, function, workspace, marker, token):
            return {
                address: answer(function, workspace, marker, token)
                for address, answer in self.answers.items()
            }

    here = lambda f, *args: f(*args)  # noqa: E731  a worker on this filesystem
    elsewhere = lambda f, w, m, t: f(str(tmp_path / "not-mounted"), m, t)  # noqa: E731  another one
    workspace = tmp_path / "ws"
    check_shared_workspace(Cluster({"tcp://a:1": here, "tcp://b:1": here}), workspace)
    with pytest.raises(WorkspaceNotShared) as error:
        check_shared_workspace(Cluster({"tcp://a:1": here, "tcp://b:1": elsewhere}), workspace)
    message = str(error.value)
    assert "1 of 2 Dask workers" in message and "tcp://b:1" in message and "tcp://a:1" not in message
    assert "cannot read" in message and "task_runner local" in message
    assert not list(workspace.iterdir())  # the marker is gone, no stage was started
    # a marker from another run at the same path: a different filesystem
    (workspace / ".dask-probe-x").write_text("other")
    assert "different filesystem" in probe_workspace(str(workspace), ".dask-probe-x", "mine")
    with pytest.raises(WorkspaceNotShared, match="no workers"):
        check_shared_workspace(Cluster({}), tmp_path / "ws2")
