"""Scale-out: the same flow on a Dask cluster, and training on several processes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pytest

from flows.cli import main
from tasks.core.store import Store

from helpers import write_beir_subset

STAGES_IN_PARTS = ("embeddings", "queries", "lists")


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
        "--lists-part-size",
        "32",
        *extra,
    ]


def _assert_same_stages(local: Store, other: Store, in_parts=STAGES_IN_PARTS) -> None:
    """Every stage of ``local`` has the same keys in ``other`` and the same rows: ids and texts exactly,
    embeddings and scores to float rounding (a worker computes with one thread, the flow with two)."""
    stages = sorted(p.name for p in local.workspace.iterdir() if local.keys(p.name))
    assert set(in_parts) <= set(stages)
    for stage in stages:
        keys = local.keys(stage)
        assert sorted(other.keys(stage)) == sorted(keys), stage
        for key in keys:
            mine, theirs = local.read(stage, key), other.read(stage, key)
            assert mine.schema == theirs.schema and mine.num_rows == theirs.num_rows, stage
            for name in mine.column_names:
                a, b = mine.column(name).to_pylist(), theirs.column(name).to_pylist()
                kind = mine.schema.field(name).type
                kind = getattr(kind, "value_type", kind)  # a list's items
                if pa.types.is_floating(kind):
                    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5, err_msg=stage)
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
    # every part of the per-part stages ran as a task on the cluster, the killed one twice: 60
    # documents in parts of 8 (8 encoding and 8 query parts) and the training queries' candidate
    # lists in parts of 32
    store = Store(distributed)
    parts = {
        stage: sum(len(store.manifest(stage, key)["parts"]) for key in store.keys(stage))
        for stage in STAGES_IN_PARTS
    }
    assert parts["embeddings"] == parts["queries"] == 8 and parts["lists"] >= 2, parts
    started = len(list(faults.glob("started-*")))
    assert started >= sum(parts.values()) + 1
    _assert_same_stages(Store(local), store)
    report_local = sorted((local / "reports").glob("adapt-text-*.json"))
    report_dask = sorted((distributed / "reports").glob("adapt-text-*.json"))
    assert len(report_local) == len(report_dask) == 1


@pytest.mark.slow
def test_gpl_mining_and_labelling_run_on_a_dask_cluster_as_in_one_process(
    prefect_harness, tmp_path, small_beir, tiny_bi_encoder
):
    """Method marginmse on 2 worker processes: negatives and labels are computed in parts on the
    workers (which rebuild the embeddings, the FAISS and BM25 indexes and the teacher from the
    workspace); the worker that starts the second mining part dies on the spot. The run finishes and
    every stage equals the one-process run's."""
    from dask_faults import KillWorkerOnce
    from distributed import Client, LocalCluster

    gpl = [
        "--method",
        "marginmse",
        "--train-max-steps",
        "1",
        "--train-batch-size",
        "4",
        "--train-max-seq-length",
        "32",
        "--train-eval-fraction",
        "0",
        "--mine-part-size",
        "16",
        "--label-part-size",
        "16",
    ]
    local = tmp_path / "local"
    assert main(_text_args(small_beir, local, tiny_bi_encoder, *gpl)) == 0
    faults, distributed = tmp_path / "faults", tmp_path / "dask"
    faults.mkdir()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        # 8 encoding and 8 query parts come first: task 18 is the second part of negative mining
        client.register_plugin(KillWorkerOnce(str(faults), at=18))
        address = ["--task-runner", "dask", "--dask-address", cluster.scheduler_address]
        assert main(_text_args(small_beir, distributed, tiny_bi_encoder, *gpl, *address)) == 0
    store = Store(distributed)
    parts = {
        stage: sum(len(store.manifest(stage, key)["parts"]) for key in store.keys(stage))
        for stage in ("embeddings", "queries", "negatives", "labels")
    }
    # a worker died, and it died in mining: 16 tasks came before mining's
    assert (faults / "killed").is_file() and parts["embeddings"] + parts["queries"] == 16
    assert parts["negatives"] >= 2 and parts["labels"] >= 2, parts
    # every part ran as a task on the cluster, the killed one twice
    assert len(list(faults.glob("started-*"))) >= sum(parts.values()) + 1
    _assert_same_stages(Store(local), store, in_parts=tuple(parts))
    # the workers read the corpus from the workspace: the one stage only the cluster run has
    assert store.keys("corpus-texts") and not Store(local).keys("corpus-texts")


@pytest.mark.slow
def test_catalog_refresh_runs_its_parts_on_a_dask_cluster_as_in_one_process(
    prefect_harness, tmp_path, fashion_sample, tiny_bi_encoder
):
    """catalog-refresh with the consistency filter on 2 worker processes: encoding, query generation
    (each part filtered by a teacher the worker builds from the workspace), mining and labelling run
    as parts on the workers; the worker that starts the second query part dies. Every stage equals
    the one-process refresh's."""
    from dask_faults import KillWorkerOnce
    from distributed import Client, LocalCluster
    from test_catalog_refresh import _refresh, _write_catalog

    with (fashion_sample / "styles.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:60]
    catalog = _write_catalog(rows, tmp_path / "styles.csv")
    sizes = ["--encode-part-size", "16", "--qgen-part-size", "16", "--mine-part-size", "32"]
    sizes += ["--label-part-size", "32"]
    local, distributed, faults = tmp_path / "local", tmp_path / "dask", tmp_path / "faults"
    images = fashion_sample / "images"
    assert _refresh(catalog, local, tiny_bi_encoder, *sizes, image_root=images) == 0
    faults.mkdir()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(KillWorkerOnce(str(faults), at=6))  # 4 encoding parts come first
        address = ["--task-runner", "dask", "--dask-address", cluster.scheduler_address]
        assert _refresh(catalog, distributed, tiny_bi_encoder, *sizes, *address, image_root=images) == 0
    store = Store(distributed)
    parts = {
        stage: sum(len(store.manifest(stage, key)["parts"]) for key in store.keys(stage))
        for stage in ("embeddings", "queries", "negatives", "labels")
    }
    assert (faults / "killed").is_file() and parts["embeddings"] == parts["queries"] == 4, parts
    assert parts["negatives"] >= 2 and parts["labels"] >= 2, parts
    assert len(list(faults.glob("started-*"))) >= sum(parts.values()) + 1
    _assert_same_stages(Store(local), store, in_parts=tuple(parts))


@pytest.mark.slow
def test_adapt_clip_decodes_images_on_a_dask_cluster_as_in_one_process(
    prefect_harness, tmp_path, fashion_sample
):
    """Image decoding in parts of 8 products on 2 worker processes: the decoded images (a bad one
    included, with its reason) and the pairs equal the one-process run's."""
    from test_adapt_clip import TINY
    from test_pairs import small_catalog

    catalog, _, images = small_catalog(tmp_path / "cat", fashion_sample, n=40)
    (tmp_path / "cat" / "images" / images[5]).write_bytes(b"not an image")
    runs = {}
    for name, extra in {"local": [], "dask": ["--task-runner", "dask", "--dask-workers", "2"]}.items():
        runs[name] = tmp_path / name
        args = ["clip", "--catalog", str(catalog), "--workspace", str(runs[name]), "--image-part-size", "8"]
        assert main([*args, *TINY, *extra]) == 0
    local, distributed = Store(runs["local"]), Store(runs["dask"])
    _assert_same_stages(local, distributed, in_parts=("decoded-images", "pairs"))
    (key,) = local.keys("decoded-images")
    assert len(local.manifest("decoded-images", key)["parts"]) == 5
    decoded = local.read_pandas("decoded-images", key)
    bad = decoded[decoded["pixels"].isna()]
    assert len(bad) == 1 and bad["reason"].iloc[0]


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


# ------------------------------------------------------------------ training on several processes


def _margin_rows(n: int = 24):
    from finetune.marginmse import TrainingRows

    rng = np.random.default_rng(0)
    words = "cell protein gene tumour patient dose virus brain heart liver blood trial".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words, size=k))

    return TrainingRows(
        queries=[text(4) for _ in range(n)],
        positives=[text(12) for _ in range(n)],
        negatives=[[text(12) for _ in range(2)] for _ in range(n)],
        margins=[list(rng.uniform(0.5, 3.0, size=2)) for _ in range(n)],
    )


@pytest.mark.slow
def test_marginmse_on_two_processes_saves_a_model_that_loads_and_is_reused(tmp_path, tiny_bi_encoder):
    """torchrun with 2 CPU processes (gloo): rank 0 writes the checkpoints, the model and the result;
    a rerun reads the finished run back without training."""
    from sentence_transformers import SentenceTransformer

    from finetune.launch import marginmse_on_processes
    from finetune.marginmse import TrainConfig

    config = TrainConfig(
        max_steps=4,
        batch_size=4,
        negatives_per_query=2,
        max_seq_length=32,
        save_steps=2,
        eval_fraction=0,
        label_scale=0.1,
        processes=2,
    )
    out = tmp_path / "train"
    result = marginmse_on_processes(str(tiny_bi_encoder), _margin_rows(), config, out, processes=2)
    assert result.steps == 4 and result.model_dir == out / "model"
    log = (out / "torchrun.log").read_text()
    assert json.loads((out / "result.json").read_text())["processes"] == 2, log
    assert (out / "checkpoints" / "checkpoint-4").is_dir()  # checkpoints as with one process
    model = SentenceTransformer(str(result.model_dir), device="cpu")
    vectors = model.encode(["cell protein", "tumour dose"], normalize_embeddings=True)
    assert vectors.shape[0] == 2 and np.isfinite(vectors).all()
    before = SentenceTransformer(str(tiny_bi_encoder), device="cpu").encode(["cell protein"])
    assert not np.allclose(model.encode(["cell protein"]), before)  # it trained
    stamp = (out / "result.json").stat().st_mtime_ns
    again = marginmse_on_processes(str(tiny_bi_encoder), _margin_rows(), config, out, processes=2)
    assert again.steps == 4 and (out / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_clip_on_two_processes_takes_the_loss_over_both_processes_embeddings(tmp_path, fashion_sample):
    """A tiny CLIPConfig model on 2 processes: each encodes half of every batch, and the loss is over
    the gathered embeddings of both, so its losses equal the one-process run's on the same batches
    (a loss over one process's half would be another number), and the saved model loads."""
    from test_pairs import small_catalog
    from tiny_clip import build_tiny_clip

    from finetune.clip.config import ClipTrainConfig
    from finetune.clip.stage import train_stage
    from finetune.launch import clip_on_processes
    from tasks.catalog.encoders import load_catalog_encoder
    from tasks.catalog.pairs import pairs_stage

    model = build_tiny_clip(tmp_path / "tiny-clip")
    catalog, _, _ = small_catalog(tmp_path / "cat", fashion_sample, n=24)
    config = ClipTrainConfig(
        epochs=2,
        batch_size=8,
        clip_learning_rate=1e-3,
        warmup_fraction=0.0,
        augment=False,
        wise_ft_ratio=1.0,
        checkpoint_every=1000,
    )
    settings = {"heldout_fraction": 0.1, "split_salt": "holdout", "image_size": (80, 60)}
    alone_ws, two_ws = tmp_path / "alone", tmp_path / "two"
    alone = train_stage(
        str(model),
        str(pairs_stage(catalog, alone_ws, show_progress=False).path),
        config,
        workspace=alone_ws,
        show_progress=False,
        **settings,
    )
    two = clip_on_processes(
        str(model),
        str(pairs_stage(catalog, two_ws, show_progress=False).path),
        config.model_copy(update={"processes": 2}),
        2,
        workspace=two_ws,
        **settings,
    )
    assert two["key"] == alone["key"]  # the number of processes is not part of the stage's key
    losses_alone, losses_two = alone["result"]["losses"], two["result"]["losses"]
    assert len(losses_two) == len(losses_alone) >= 4
    np.testing.assert_allclose(losses_two, losses_alone, rtol=1e-3, atol=1e-4)
    encoder = load_catalog_encoder(two["model_dir"])
    assert encoder.kind == "clip" and np.isfinite(encoder.encode_text(["a red shirt"])).all()


def test_an_unreachable_cluster_stops_the_command_with_exit_2(
    prefect_harness, tmp_path, small_beir, tiny_bi_encoder, capsys
):
    """A scheduler that is not there: one line naming the address and what to do, before any stage."""
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        code = main(
            _text_args(
                small_beir,
                tmp_path / "ws",
                tiny_bi_encoder,
                "--task-runner",
                "dask",
                "--dask-address",
                "tcp://127.0.0.1:9",
            )
        )
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot use the Dask cluster at tcp://127.0.0.1:9" in err and "task_runner local" in err
    assert not (tmp_path / "ws" / "embeddings").exists()


@pytest.mark.slow
def test_flags_start_training_on_two_processes_from_the_flows(
    prefect_harness, tmp_path, small_beir, quora_sample, tiny_bi_encoder
):
    """``--train-processes 2``: adapt text (MarginMSE) and adapt supervised (MNRL, in-batch negatives
    gathered over both processes) train under torchrun, register the model and report as usual."""
    from test_supervised_cli import subset

    text_ws = tmp_path / "text"
    code = main(
        _text_args(
            small_beir,
            text_ws,
            tiny_bi_encoder,
            "--method",
            "marginmse",
            "--train-processes",
            "2",
            "--train-max-steps",
            "2",
            "--train-batch-size",
            "4",
            "--train-max-seq-length",
            "32",
            "--train-save-steps",
            "2",
            "--train-eval-fraction",
            "0",
            "--train-logging-steps",
            "1",
        )
    )
    assert code == 0
    results = list((text_ws / "train").glob("*/result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["processes"] == 2
    assert (results[0].parent / "torchrun.log").is_file()
    report = json.loads(next((text_ws / "reports").glob("adapt-text-*.json")).read_text())
    assert report["train"]["steps"] == 2 and report["method"] == "marginmse"

    train = subset(quora_sample / "train.tsv", tmp_path / "train.tsv", 200)
    evaluation = subset(quora_sample / "test.tsv", tmp_path / "test.tsv", 100)
    supervised_ws = tmp_path / "supervised"
    output = tmp_path / "supervised.json"
    code = main(
        [
            "supervised",
            "--train",
            str(train),
            "--eval",
            str(evaluation),
            "--model",
            str(tiny_bi_encoder),
            "--batch-size",
            "16",
            "--max-seq-length",
            "32",
            "--train-processes",
            "2",
            "--workspace",
            str(supervised_ws),
            "--output",
            str(output),
        ]
    )
    assert code == 0
    report = json.loads(output.read_text())
    assert report["training"]["processes"] == 2 and report["training"]["steps"] > 0
    logs = list(supervised_ws.rglob("torchrun.log"))
    assert len(logs) == 1


@pytest.mark.slow
def test_marginmse_on_two_processes_resumes_from_its_checkpoint(tmp_path, tiny_bi_encoder):
    """A run cut off after its step-2 checkpoint (its model and result gone) resumes there on 2
    processes, as a one-process run does, and finishes the steps left."""
    import shutil

    from finetune.launch import marginmse_on_processes
    from finetune.marginmse import TrainConfig

    settings = dict(
        batch_size=4, negatives_per_query=2, max_seq_length=32, save_steps=2, eval_fraction=0, label_scale=0.1
    )
    out = tmp_path / "train"
    marginmse_on_processes(str(tiny_bi_encoder), _margin_rows(), TrainConfig(max_steps=2, **settings), out, 2)
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    shutil.rmtree(out / "model")
    (out / "result.json").unlink()  # as if the run had stopped right after the checkpoint
    result = marginmse_on_processes(
        str(tiny_bi_encoder), _margin_rows(), TrainConfig(max_steps=4, **settings), out, 2
    )
    assert result.steps == 4 and result.resumed_from and result.resumed_from.endswith("checkpoint-2")
    assert (out / "model").is_dir()
