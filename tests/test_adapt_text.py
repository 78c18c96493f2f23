"""The adapt-text flow end to end (tiny bi-encoder, so it runs in seconds), through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.adapt_text import AdaptTextConfig
from flows.cli import main
from tasks.core.corpus import read_corpus
from tasks.core.heldout import heldout_mask, split_heldout_queries
from tasks.core.registry import Registry
from tasks.core.store import Store
from tasks.serving.search import Searcher

from helpers import write_beir_subset


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory, scifact_sample):
    return write_beir_subset(scifact_sample, tmp_path_factory.mktemp("beir"), n_queries=12, n_docs=60)


def _args(corpus, workspace, model, *extra):
    return [
        "text",
        "--corpus",
        str(corpus),
        "--workspace",
        str(workspace),
        "--base-model",
        str(model),
        "--train-max-steps",
        "3",
        "--train-batch-size",
        "4",
        "--train-max-seq-length",
        "48",
        "--train-save-steps",
        "2",
        "--train-eval-steps",
        "2",
        "--listwise-max-steps",
        "3",
        "--listwise-batch-size",
        "4",
        "--listwise-max-seq-length",
        "48",
        "--listwise-save-steps",
        "2",
        "--lists-top",
        "8",
        "--lists-sampled",
        "4",
        "--mine-max-seq-length",
        "64",
        "--eval-max-seq-length",
        "64",
        *extra,
    ]


def test_text_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["text", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in AdaptTextConfig.model_fields:
        if name not in ("qgen", "mine", "label", "train", "lists", "listwise"):
            assert "--" + name.replace("_", "-") in text
    for option in (
        "--qgen-generator",
        "--qgen-consistency-top-k",
        "--mine-num-negatives",
        "--label-teacher",
        "--label-bm25-weight",
        "--train-learning-rate",
        "--train-time-budget-minutes",
        "--listwise-learning-rate",
        "--listwise-average-with-start",
        "--lists-sampled",
        "--preset",
    ):
        assert option in text


def test_bad_text_arguments_exit_2_with_the_reason(prefect_harness, capsys, tmp_path, small_beir):
    assert main(["text", "--corpus", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"_id": "1", "text": "fine"}\n{"_id": "2", "text": \n')
    assert main(["text", "--corpus", str(bad)]) == 2
    out = capsys.readouterr().err
    assert str(bad) in out and "line 2" in out
    assert main(["text", "--corpus", str(small_beir), "--label-teacher", "acme/no-such-cross-encoder"]) == 2
    assert "acme/no-such-cross-encoder" in capsys.readouterr().err
    assert main(["text", "--corpus", str(small_beir), "--eval", str(small_beir), "--eval-split", "dev"]) == 2
    assert "dev.tsv" in capsys.readouterr().err


@pytest.mark.slow
def test_adapt_text_with_the_users_judgments(prefect_harness, tmp_path, small_beir, tiny_bi_encoder, capsys):
    workspace = tmp_path / "ws"
    assert main(_args(small_beir, workspace, tiny_bi_encoder, "--eval", str(small_beir))) == 0
    out = capsys.readouterr().out
    assert "nDCG@10" in out and "Example matches" in out
    reports = sorted((workspace / "reports").glob("adapt-text-*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert "the user's queries" in report["eval_set"] and "12 queries" in report["eval_set"]
    assert report["train"]["steps"] == 3 and report["queries_kept"] > 0
    assert set(report["stages"]) >= {
        "choose bm25 weight",
        "generate queries",
        "candidate lists",
        "train",
        "evaluate before",
        "evaluate after",
        "evaluate before (hybrid)",
        "evaluate after (hybrid)",
    }
    assert "dense" in out.lower() and "Hybrid" in out
    assert (workspace / "reports" / f"{reports[0].stem}-loss.png").stat().st_size > 1000
    registry = Registry(workspace)
    assert registry.versions("text-retriever") == ["v0001"]
    mode = report["serve_mode"]
    prefix = "hybrid_" if mode == "hybrid" else ""
    after, before = report[f"{prefix}ndcg@10_after"], report[f"{prefix}ndcg@10_before"]
    # the served mode is the one that measured better after training
    assert mode == ("hybrid" if report["hybrid_ndcg@10_after"] > report["ndcg@10_after"] else "dense")
    better = after > before
    assert report["promoted"] == better
    # the gate compared exactly the reported before/after scores of the served mode (like with like)
    assert f"{after:.4f}" in report["decision"] and f"{before:.4f}" in report["decision"]
    assert f"{mode} nDCG@10" in report["decision"]
    assert registry.current("text-retriever") == ("v0001" if better else None)
    card = registry.card("text-retriever", "v0001")
    assert card["metrics_before"]["nDCG@10"] == pytest.approx(report["ndcg@10_before"])
    assert card["metrics_after_hybrid"]["nDCG@10"] == pytest.approx(report["hybrid_ndcg@10_after"])
    assert card["serving"]["mode"] == mode and 0 <= card["serving"]["bm25_weight"] <= 1
    assert card["serving"]["bm25_weight"] == report["bm25_weight_after"]["weight"]
    # only the query side trained: documents keep the start model's embeddings
    assert card["method"] == "listwise" and card["document_model"] == str(tiny_bi_encoder)

    # long stages publish progress artifacts in the flow run, finished at 100%
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    progress = {a.description: a.data for a in artifacts if a.type == "progress"}
    assert progress.get("training steps") == 100.0 and progress.get("query generation (parts)") == 100.0
    assert any(a.key == "adapt-text-report" for a in artifacts)


@pytest.mark.slow
def test_adapt_text_without_judgments_holds_out_generated_queries(
    prefect_harness, tmp_path, small_beir, tiny_bi_encoder, capsys
):
    workspace = tmp_path / "ws"
    args = _args(
        small_beir,
        workspace,
        tiny_bi_encoder,
        "--heldout-fraction",
        "0.2",
        "--qgen-consistency-top-k",
        "20",
        "--no-continue-from-current",
    )
    assert main(args) == 0
    first = json.loads(sorted((workspace / "reports").glob("adapt-text-*.json"))[0].read_text())
    assert "held-out generated queries" in first["eval_set"]
    assert first["queries_generated"] >= first["queries_kept"] > 0
    store = Store(workspace)
    queries = store.read_pandas("queries", store.keys("queries")[0])
    ids = read_corpus(small_beir).ids
    probe_docs = {d for d, held in zip(ids, heldout_mask(ids, 0.2, salt="probe"), strict=True) if held}
    _, heldout = split_heldout_queries(queries[~queries["doc_id"].isin(probe_docs)], 0.2, 300, seed=13)
    assert f"{len(heldout)} queries" in first["eval_set"]
    lists = store.read_pandas("lists", store.keys("lists")[0])
    trained_docs = set(queries.set_index("query_id").loc[lists["query_id"].unique(), "doc_id"])
    assert trained_docs and not set(heldout["doc_id"]) & trained_docs  # no held-out document trained
    assert probe_docs and not probe_docs & trained_docs  # nor one the BM25 weight is chosen on
    keys = {stage: store.keys(stage) for stage in ("queries", "lists", "embeddings")}

    # the same run again reuses every stage and the trained model
    capsys.readouterr()
    assert main(args) == 0
    assert {stage: store.keys(stage) for stage in keys} == keys
    second = json.loads(sorted((workspace / "reports").glob("adapt-text-*.json"))[-1].read_text())
    assert second["train"]["steps"] == 3 and second["ndcg@10_after"] == pytest.approx(first["ndcg@10_after"])


@pytest.mark.slow
def test_models_and_search_commands(prefect_harness, tmp_path, small_beir, tiny_bi_encoder, capsys):
    workspace = tmp_path / "ws"
    assert main(["search", "cells", "--workspace", str(workspace)]) == 2
    assert "run `adapt text` first" in capsys.readouterr().err
    # no nDCG@10 can improve by more than 1: the gate must refuse, and a person may still promote it
    assert (
        main(
            _args(
                small_beir,
                workspace,
                tiny_bi_encoder,
                "--listwise-max-steps",
                "1",
                "--promote-min-delta",
                "1",
            )
        )
        == 0
    )
    registry = Registry(workspace)
    assert registry.versions("text-retriever") == ["v0001"] and registry.current("text-retriever") is None
    assert registry.history("text-retriever")[-1]["event"] == "rejected"
    assert main(["models", "promote", "text-retriever", "v0001", "--workspace", str(workspace)]) == 0
    assert registry.current("text-retriever") == "v0001"
    assert registry.history("text-retriever")[-1]["reason"] == "promoted by hand"
    capsys.readouterr()
    assert main(["models", "list", "--workspace", str(workspace)]) == 0
    assert "v0001" in capsys.readouterr().out
    assert main(["models", "show", "text-retriever", "--workspace", str(workspace)]) == 0
    assert '"version": "v0001"' in capsys.readouterr().out
    assert main(["models", "show", "text-retriever", "v0009", "--workspace", str(workspace)]) == 2
    assert "no version 'v0009'" in capsys.readouterr().err
    assert main(["models", "rollback", "text-retriever", "--workspace", str(workspace)]) == 2
    assert "nothing to roll back to" in capsys.readouterr().err

    corpus = read_corpus(small_beir)
    title = corpus.docs["title"].iat[3]
    dense = ["--mode", "dense"]
    assert main(["search", title, "--top-k", "5", "--json", "--workspace", str(workspace), *dense]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and all(h["doc_id"] in set(corpus.ids) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    index_dir = registry.path("text-retriever", "v0001") / "index"
    assert (index_dir / "index.faiss").is_file()

    # the Python API gives the same ranking, with the model's own embeddings
    searcher = Searcher(workspace, "text-retriever")
    assert searcher.mode == registry.card("text-retriever", "v0001")["serving"]["mode"]
    assert [h.doc_id for h in searcher.search(title, k=5, mode="dense")] == [h["doc_id"] for h in hits]
    query_vector = searcher.encode([title])[0]
    doc_vector = searcher.encode_documents([corpus.texts()[corpus.ids.index(hits[0]["doc_id"])]])[0]
    assert float(query_vector @ doc_vector) == pytest.approx(hits[0]["score"], abs=1e-4)

    # hybrid: the card's weight over the dense scores and BM25 of the same corpus
    from tasks.core.bm25 import BM25Index
    from tasks.core.hybrid import hybrid_rows

    assert (
        main(["search", title, "--top-k", "5", "--json", "--mode", "hybrid", "--workspace", str(workspace)])
        == 0
    )
    fused_hits = json.loads(capsys.readouterr().out)
    bm25 = BM25Index(corpus.texts())
    documents = searcher.encode_documents(corpus.texts())
    row = hybrid_rows(
        query_vector[None, :] @ documents.T,
        bm25.all_scores(bm25.query_ids([title])[0])[None, :],
        searcher.bm25_weight,
        searcher.serving["pool"],
    )[0]
    expected = [corpus.ids[i] for i in np.argsort(-row)[:5]]
    assert [h["doc_id"] for h in fused_hits] == expected
    assert fused_hits[0]["doc_id"] == corpus.ids[3]  # its own title finds it
    with pytest.raises(SystemExit) as info:
        main(["search", title, "--mode", "fuzzy", "--workspace", str(workspace)])
    assert info.value.code == 2 and "invalid choice: 'fuzzy'" in capsys.readouterr().err


@pytest.mark.slow
def test_adapt_text_with_a_seq2seq_generator_and_a_cross_encoder_teacher(
    prefect_harness, tmp_path, small_beir, tiny_bi_encoder, tiny_t5, tiny_cross_encoder
):
    """The GPL path of the flow (generator and teacher models given as directories), with tiny models."""
    workspace = tmp_path / "ws"
    args = _args(
        small_beir,
        workspace,
        tiny_bi_encoder,
        "--preset",
        "gpl",
        "--qgen-generator",
        str(tiny_t5),
        "--qgen-queries-per-doc",
        "2",
        "--qgen-max-new-tokens",
        "8",
        "--label-teacher",
        str(tiny_cross_encoder),
        "--label-max-length",
        "64",
        "--eval",
        str(small_beir),
    )
    assert main(args) == 0
    report = json.loads(sorted((workspace / "reports").glob("adapt-text-*.json"))[0].read_text())
    store = Store(workspace)
    queries = store.read_pandas("queries", store.keys("queries")[0])
    assert set(queries["source"]) == {str(tiny_t5)}
    assert queries.groupby("doc_id").size().max() <= 2
    labels_manifest = store.manifest("labels", store.keys("labels")[0])
    assert labels_manifest["teacher"] == str(tiny_cross_encoder)
    labels = store.read_pandas("labels", store.keys("labels")[0])
    assert len(labels) > 0 and (labels["margin"] == labels["score_pos"] - labels["score_neg"]).all()
    assert report["train"]["steps"] == 3
    assert Registry(workspace).card("text-retriever", "v0001")["config"]["label"]["teacher"] == str(
        tiny_cross_encoder
    )
