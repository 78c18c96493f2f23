"""Judged queries over a corpus (`adapt supervised --train FOLDER`, click logs): readers, the carved
split, candidate lists with judged documents, the contrastive term, and the flow end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.listwise import judged_loss
from flows.cli import main
from tasks.core.corpus import DataError, read_corpus, read_judged_queries
from tasks.core.registry import Registry
from tasks.core.store import Store
from tasks.labelled.judged import carve_by_query, judged_lists, query_id_of, read_click_log, subset

from helpers import write_beir_subset


@pytest.fixture(scope="module")
def judged_beir(tmp_path_factory, scifact_sample):
    """A BEIR folder with a train split (16 queries) and a test split (8 others)."""
    folder = write_beir_subset(scifact_sample, tmp_path_factory.mktemp("judged"), n_queries=24, n_docs=60)
    lines = (folder / "qrels" / "test.tsv").read_text().splitlines()
    header, rows = lines[0], lines[1:]
    queries = list(dict.fromkeys(r.split("\t")[0] for r in rows))
    train = [r for r in rows if r.split("\t")[0] in queries[:16]]
    test = [r for r in rows if r.split("\t")[0] in queries[16:]]
    (folder / "qrels" / "train.tsv").write_text("\n".join([header, *train]) + "\n")
    (folder / "qrels" / "test.tsv").write_text("\n".join([header, *test]) + "\n")
    return folder


@pytest.fixture(scope="module")
def corpus_with_an_empty_document(tmp_path_factory):
    path = tmp_path_factory.mktemp("clicks") / "corpus.jsonl"
    docs = [
        {"_id": "d1", "title": "Solar panels", "text": "Photovoltaic cells turn light into power."},
        {"_id": "d2", "title": "Wind", "text": "Turbines turn wind into power."},
        {"_id": "d3", "title": "", "text": ""},  # left out by the reader
    ]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return read_corpus(path)


def test_click_log_reads_queries_counts_dropped_rows_and_ignores_zero_clicks(
    tmp_path, corpus_with_an_empty_document
):
    log = tmp_path / "clicks.tsv"
    log.write_text(
        "query\tdoc_id\tclicks\n"
        "solar power\td1\t3\n"
        "solar power\td2\t0\n"
        "wind power\td2\t1\n"
        "wind power\td3\t2\n"
        "solar power\td1\t1\n"
    )
    data = read_click_log(log, corpus_with_an_empty_document)
    assert data.qrels == {query_id_of("solar power"): {"d1": 1}, query_id_of("wind power"): {"d2": 1}}
    assert data.queries["text"].tolist() == ["solar power", "wind power"]
    assert data.dropped_judgments == 1  # d3 is empty: its row is counted and dropped


@pytest.mark.parametrize(
    ("content", "line", "expected"),
    [
        ("query\tdoc_id\nsolar\tnope\n", 2, "document id 'nope' is not in the corpus"),
        ("query\tdoc_id\tclicks\nsolar\td1\tmany\n", 2, "is not a number of clicks"),
        ("query\tdoc_id\tclicks\nsolar\td1\t1\nwind\td2\t-1\n", 3, "is not a count"),
        ("query\tdoc_id\n\td1\n", 2, "empty query text"),
        ("text\tdoc_id\nsolar\td1\n", 2, "no query; expected a field named query"),
        ("query\tdocument\nsolar\td1\n", 2, "no document id"),
    ],
)
def test_click_log_errors_name_the_file_and_line(
    tmp_path, corpus_with_an_empty_document, content, line, expected
):
    log = tmp_path / "clicks.tsv"
    log.write_text(content)
    with pytest.raises(DataError) as info:
        read_click_log(log, corpus_with_an_empty_document)
    assert info.value.line == line and expected in str(info.value) and str(log) in str(info.value)


def test_a_click_log_with_no_click_is_an_error(tmp_path, corpus_with_an_empty_document):
    log = tmp_path / "clicks.csv"
    log.write_text("query,doc_id,clicks\nsolar,d1,0\n")
    with pytest.raises(DataError, match="no clicked"):
        read_click_log(log, corpus_with_an_empty_document)


def test_the_carved_split_shares_no_query_and_is_stable(judged_beir):
    data = read_judged_queries(judged_beir, "train", read_corpus(judged_beir))
    train, held = carve_by_query(data, 0.25)
    train_ids, held_ids = set(train.queries["query_id"]), set(held.queries["query_id"])
    assert train_ids and held_ids and not train_ids & held_ids
    assert train_ids | held_ids == set(data.queries["query_id"])
    assert set(train.qrels) == train_ids and set(held.qrels) == held_ids
    again, _ = carve_by_query(data, 0.25)
    assert set(again.queries["query_id"]) == train_ids


def test_judged_lists_hold_every_judged_document_and_filter_unjudged_ones_above_them(judged_beir):
    corpus = read_corpus(judged_beir)
    full = read_judged_queries(judged_beir, "train", corpus)
    two = subset(full, set(full.queries["query_id"].head(2)), "train")
    row_of = {d: i for i, d in enumerate(corpus.ids)}
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(2, len(corpus))).astype(np.float32)
    first_positive = row_of[next(iter(two.qrels[two.queries["query_id"][0]]))]
    rows[0, first_positive] = -10.0  # the teacher misses a judged document: it is put into the list
    built = judged_lists(two, rows, row_of, top=5)
    assert built.candidates.shape == (2, 5) and built.positives_added >= 1
    for i, query_id in enumerate(two.queries["query_id"]):
        judged_rows = {row_of[d] for d in two.qrels[query_id]}
        listed = built.candidates[i].tolist()
        assert judged_rows <= set(listed)
        assert {c for c, r in zip(listed, built.relevance[i], strict=True) if r == 1} == judged_rows
        best_judged = max(rows[i, list(judged_rows)])
        for c, r in zip(listed, built.relevance[i], strict=True):
            if c not in judged_rows:  # -1 exactly for the unjudged candidates above every judged one
                assert (r == -1) == (rows[i, c] > best_judged)
        assert built.scores[i].tolist() == pytest.approx(rows[i, listed].tolist())
    assert built.filtered == int((built.relevance == -1).sum())


def test_judged_loss_ignores_filtered_candidates_and_rows_without_judgments():
    import torch

    student = torch.tensor([[0.5, 0.2, 0.9, 0.1], [0.3, 0.3, 0.3, 0.3]])
    relevance = torch.tensor([[1, 0, -1, 0], [0, 0, 0, 0]], dtype=torch.int8)
    loss = judged_loss(student, relevance, 0.05)
    kept = student[0, [0, 1, 3]] / 0.05
    expected = torch.logsumexp(kept, 0) - kept[0]  # the filtered candidate is not in the softmax
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(judged_loss(student, torch.zeros_like(relevance), 0.05)) == 0.0
    better = judged_loss(torch.tensor([[0.9, 0.2, 0.9, 0.1]]), relevance[:1], 0.05)
    assert float(better) < float(loss)


def _supervised_args(folder, workspace, model, *extra):
    return [
        "supervised",
        "--train",
        str(folder),
        "--workspace",
        str(workspace),
        "--model",
        str(model),
        "--listwise-max-steps",
        "3",
        "--listwise-batch-size",
        "4",
        "--listwise-max-seq-length",
        "48",
        "--lists-top",
        "8",
        "--eval-max-seq-length",
        "64",
        *extra,
    ]


def test_judged_mode_bad_input_exits_2_with_the_reason(prefect_harness, judged_beir, tmp_path, capsys):
    assert main(["supervised", "--train", str(judged_beir), "--train-split", "dev"]) == 2
    assert "dev.tsv" in capsys.readouterr().err
    log = tmp_path / "clicks.tsv"
    log.write_text("query\tdoc_id\nsolar\tno-such-doc\n")
    workspace = tmp_path / "ws"
    assert main(_supervised_args(log, workspace, "all-MiniLM-L6-v2", "--corpus", str(judged_beir))) == 2
    err = capsys.readouterr().err
    assert str(log) in err and "line 2" in err and "no-such-doc" in err
    bad_range = ["--search", "2", "--search-label-weight", "3", "1"]
    assert main(["supervised", "--train", str(judged_beir), *bad_range]) == 2
    assert "search_label_weight" in capsys.readouterr().err


@pytest.mark.slow
def test_judged_queries_train_evaluate_and_gate_then_mix_in_adapt_texts_lists(
    prefect_harness, judged_beir, tmp_path, tiny_bi_encoder, capsys
):
    workspace = tmp_path / "ws"
    split = ["--train-split", "train", "--eval", str(judged_beir), "--eval-split", "test"]
    assert main(_supervised_args(judged_beir, workspace, tiny_bi_encoder, *split)) == 0
    out = capsys.readouterr().out
    assert "Hybrid" in out and "Example matches" in out
    report = json.loads(sorted((workspace / "reports").glob("supervised-*.json"))[-1].read_text())
    assert report["rows"] == {"train": 16, "eval": 8, "pseudo": 0} and report["train"]["steps"] == 3
    assert "8 queries" in report["eval"]
    registry = Registry(workspace)
    card = registry.card("supervised", report["version"])
    assert card["document_model"] == str(tiny_bi_encoder)  # only the query side trained
    assert card["serving"]["mode"] == report["serve_mode"]
    assert card["metrics_after_hybrid"]["nDCG@10"] == pytest.approx(report["hybrid_ndcg@10_after"])
    prefix = "hybrid_" if report["serve_mode"] == "hybrid" else ""
    assert report["promoted"] == (report[f"{prefix}ndcg@10_after"] > report[f"{prefix}ndcg@10_before"])

    # adapt text on the same corpus fills the store; --with-pseudo-labels then reads its lists
    text = ["text", "--corpus", str(judged_beir), "--workspace", str(workspace), "--base-model"]
    text += [str(tiny_bi_encoder), "--listwise-max-steps", "2", "--lists-top", "8"]
    assert main(text) == 0
    store = Store(workspace)
    lists_before = store.keys("lists")
    capsys.readouterr()
    mixed = [*split, "--with-pseudo-labels", "--listwise-pseudo-per-judged", "2"]
    assert main(_supervised_args(judged_beir, workspace, tiny_bi_encoder, *mixed)) == 0
    assert store.keys("lists") == lists_before  # nothing labelled again
    second = json.loads(sorted((workspace / "reports").glob("supervised-*.json"))[-1].read_text())
    assert second["rows"]["pseudo"] == 32 and second["version"] != report["version"]
    assert "with pseudo-labels" in second["loss"]

    # starting from adapt text's version: its query side trains on, its documents stay the base's
    # (the same embeddings and store keys: nothing labelled again)
    version = registry.versions("text-retriever")[-1]
    adapted = registry.path("text-retriever", version)
    assert registry.document_model("text-retriever", version) == str(tiny_bi_encoder)  # query side only
    embeddings_before = store.keys("embeddings")
    assert main(_supervised_args(judged_beir, workspace, adapted, *mixed)) == 0
    assert store.keys("lists") == lists_before and store.keys("embeddings") == embeddings_before
    on_top = json.loads(sorted((workspace / "reports").glob("supervised-*.json"))[-1].read_text())
    on_top_card = registry.card("supervised", on_top["version"])
    assert on_top_card["document_model"] == str(tiny_bi_encoder)
    assert on_top_card["start_model"] == str(adapted) and on_top["rows"]["pseudo"] == 32

    # a search over the loss mix, the share of pseudo-labels and the learning rate, then the best refit
    capsys.readouterr()
    search = [*mixed, "--search", "2", "--search-validation-fraction", "0.25"]
    assert main(_supervised_args(judged_beir, workspace, tiny_bi_encoder, *search)) == 0
    assert "Search (2 trials" in capsys.readouterr().out
    third = json.loads(sorted((workspace / "reports").glob("supervised-*.json"))[-1].read_text())
    trials = third["search"]["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "COMPLETE"] and trials[0]["default"]
    assert trials[0]["label_weight"] == 1.0 and trials[0]["pseudo_per_judged"] == 2.0
    best = third["search"]["best_params"]
    assert set(best) == {"label_weight", "pseudo_per_judged", "learning_rate"}
    assert third["settings"]["label_weight"] == pytest.approx(best["label_weight"])
    available = len(store.read_pandas("lists", lists_before[0]))
    assert third["rows"]["pseudo"] == min(available, round(best["pseudo_per_judged"] * 16))

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the report is a Prefect artifact of its own key
        keys = {a.key for a in client.read_artifacts()}
    assert "supervised-judged-report" in keys
