import math

import pandas as pd
import pytest

from tasks.core.bm25 import bm25_search
from tasks.core.corpus import Corpus, content_hash, read_beir
from tasks.core.evaluation import (
    MEASURES,
    EvalReport,
    aggregate,
    compare_per_query,
    dense_search,
    evaluate_bm25,
    evaluate_model,
    load_reports,
    markdown_table,
    save_reports,
    score_run,
)

from helpers import write_beir_subset


def make_corpus(texts: dict[str, str]) -> Corpus:
    rows = [
        {
            "doc_id": k,
            "title": "",
            "text": v,
            "image": None,
            "content_hash": content_hash("", v),
            "attributes": None,
        }
        for k, v in texts.items()
    ]
    return Corpus(pd.DataFrame(rows), source="memory")


def test_scores_follow_the_metric_definitions():
    qrels = {"q1": {"d1": 1}, "q2": {"d3": 1, "d4": 1}, "q3": {"d5": 1}}
    run = {"q1": {"d2": 0.9, "d1": 0.8}, "q2": {"d3": 0.7, "d4": 0.6, "d9": 0.5}}  # q3 unanswered
    per_query = score_run(qrels, run)
    assert set(per_query) == set(MEASURES)
    assert per_query["MRR@10"] == {"q1": 0.5, "q2": 1.0, "q3": 0.0}
    assert per_query["nDCG@10"]["q1"] == pytest.approx(1 / math.log2(3))
    assert per_query["nDCG@10"]["q2"] == pytest.approx(1.0)
    assert per_query["P@10"]["q2"] == pytest.approx(0.2)
    assert per_query["Hit@10"] == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    assert per_query["R-Precision"]["q1"] == 0.0 and per_query["R-Precision"]["q2"] == 1.0
    metrics = aggregate(per_query)
    assert metrics["MRR@10"] == pytest.approx(0.5)  # mean over all three judged queries


def test_dense_search_can_leave_the_query_itself_out(tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer

    model = load_sentence_transformer(str(tiny_bi_encoder))
    corpus = make_corpus({"a": "red shoes for running", "b": "blue jeans", "c": "red running shoes"})
    queries = pd.DataFrame({"query_id": ["a"], "text": ["red shoes for running"]})
    with_self = dense_search(model, corpus, queries, top_k=2, show_progress=False)
    assert next(iter(sorted(with_self["a"], key=with_self["a"].get, reverse=True))) == "a"
    without_self = dense_search(model, corpus, queries, top_k=2, exclude={"a": {"a"}}, show_progress=False)
    assert "a" not in without_self["a"] and len(without_self["a"]) == 2


def test_bm25_ranks_the_matching_document_first():
    corpus = make_corpus(
        {
            "1": "the mitochondria is the powerhouse of the cell",
            "2": "stock markets fell sharply on monday",
            "3": "a recipe for bread",
        }
    )
    run = bm25_search(
        corpus, pd.DataFrame({"query_id": ["q"], "text": ["mitochondrial powerhouses"]}), top_k=3
    )
    assert max(run["q"], key=run["q"].get) == "1"
    assert "3" not in run["q"]  # no shared term: no score


@pytest.fixture(scope="module")
def small_scifact(tmp_path_factory, scifact_sample):
    return read_beir(
        write_beir_subset(scifact_sample, tmp_path_factory.mktemp("beir"), n_queries=60, n_docs=200)
    )


@pytest.mark.slow
def test_minilm_retrieves_scifact_well_and_beats_a_random_model(small_scifact, tiny_bi_encoder):
    minilm = evaluate_model("all-MiniLM-L6-v2", small_scifact, show_progress=False)
    random_model = evaluate_model(str(tiny_bi_encoder), small_scifact, show_progress=False)
    bm25 = evaluate_bm25(small_scifact)
    assert minilm.n_queries == 60 and minilm.n_docs == 200
    assert minilm.primary > 0.7
    assert random_model.primary < minilm.primary - 0.3
    assert bm25.primary > 0.6
    comparison = compare_per_query(random_model, minilm)
    assert comparison["queries"] == 60
    assert comparison["improved"] > comparison["worsened"]
    assert comparison["mean_delta"] == pytest.approx(minilm.primary - random_model.primary)
    assert all(len(hits) == 10 for hits in minilm.top_hits.values())


def test_reports_roundtrip_and_render(tmp_path):
    report = EvalReport("sys", "data", 1, 3, {m: 0.5 for m in MEASURES}, {m: {"q": 0.5} for m in MEASURES})
    path = save_reports([report], tmp_path / "r.json")
    assert load_reports(path)[0] == report
    table = markdown_table([report])
    assert table.splitlines()[0].startswith("| system | nDCG@10") and "| sys | 0.5000" in table
