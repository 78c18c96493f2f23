import json

import numpy as np
import pandas as pd
import pytest

from tasks.core.corpus import DataError
from tasks.labelled.eval_set import build_eval_set
from tasks.labelled.evaluation import classification_metrics, evaluate_labelled
from tasks.labelled.readers import (
    LabelledData,
    detect_labelled_kind,
    read_label_groups,
    read_labelled,
    read_labelled_pairs,
    read_query_pairs,
)
from tasks.labelled.splits import (
    duplicate_groups,
    labelled_pairs,
    positive_pairs,
    prepare_labelled,
    shared_texts,
    split_no_shared_text,
    text_groups,
)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def pairs_data(rows):
    return LabelledData(
        "pairs", pd.DataFrame(rows, columns=["text1", "text2", "label"]).assign(line=0), "mem"
    )


# ---------------------------------------------------------------------------------------- readers


def test_quora_sample_reads_as_labelled_pairs(quora_sample):
    data = read_labelled(quora_sample / "train.tsv")
    assert data.kind == "pairs" and len(data) == 1000
    assert set(data.rows["label"]) == {0, 1}
    assert list(data.rows.columns) == ["text1", "text2", "label", "line"]
    assert data.rows["line"].iloc[0] == 2  # line 1 is the header
    # double quotes are text, not CSV quoting
    assert data.rows["text1"].str.contains('"').any() or data.rows["text2"].str.contains('"').any()


def test_groups_and_query_rows_in_csv_jsonl_parquet(tmp_path):
    groups = write(
        tmp_path / "g.csv",
        'text,label\n"Reset my password",pw\nForgot password,pw\nCancel order,cancel\n'
        "Stop my order,cancel\nWhere is my parcel,track\n",
    )
    data = read_labelled(groups)
    assert data.kind == "groups" and data.rows["label"].tolist() == ["pw", "pw", "cancel", "cancel", "track"]
    queries = write(
        tmp_path / "q.jsonl",
        "\n".join(
            json.dumps(r)
            for r in [
                {
                    "query": "reset password",
                    "positive": "How to reset your password",
                    "negative": "Order tracking",
                },
                {"query": "cancel order", "positive": "Cancelling an order", "negative": "Password help"},
            ]
        )
        + "\n",
    )
    data = read_labelled(queries)
    assert data.kind == "triplets" and data.rows["negative"].tolist() == ["Order tracking", "Password help"]
    parquet = tmp_path / "q.parquet"
    pd.DataFrame({"anchor": ["a b", "c d"], "positive": ["a b c", "c d e"]}).to_parquet(parquet)
    data = read_query_pairs(parquet)
    assert data.rows["negative"].isna().all() and detect_labelled_kind(parquet) == "triplets"


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("is_duplicate\tquestion1\tquestion2\n1\ta\tb\n0\tc\n", 3, "expected 3 fields"),
        (
            "is_duplicate\tquestion1\tquestion2\n1\ta\tb\n2\tc\td\n",
            3,
            "'is_duplicate' is '2'; expected a label 0 or 1",
        ),
        ("is_duplicate\tquestion1\tquestion2\n1\ta\tb\nyes\tc\td\n", 3, "expected a label 0 or 1"),
        ("is_duplicate\tquestion1\tquestion2\n1\ta\t \n", 2, "field 'question2' is empty; expected a text"),
        ("duplicate_of\tquestion1\tquestion2\n1\ta\tb\n", 1, "no label (0/1) column"),
    ],
)
def test_bad_pair_files_name_file_line_and_expectation(tmp_path, content, line, message):
    path = write(tmp_path / "pairs.tsv", content)
    with pytest.raises(DataError) as info:
        read_labelled_pairs(path)
    assert info.value.line == line and str(path) in str(info.value)
    assert message in info.value.message


def test_bad_group_and_query_files(tmp_path):
    with pytest.raises(DataError, match="line 1: no group label column"):
        read_label_groups(write(tmp_path / "a.csv", "text,tag\nx,1\n"))
    with pytest.raises(DataError, match="no label is shared by two texts"):
        read_label_groups(write(tmp_path / "b.csv", "text,label\nx,1\ny,2\n"))
    with pytest.raises(DataError, match="line 2: no 'positive' field"):
        read_query_pairs(write(tmp_path / "c.jsonl", '{"query": "q", "positive": "p"}\n{"query": "r"}\n'))
    with pytest.raises(
        DataError, match="line 1: cannot tell the layout from the column names.*found .id., .body."
    ):
        read_labelled(write(tmp_path / "d.csv", "id,body\n1,x\n"))
    with pytest.raises(DataError, match="no rows in the file"):
        read_labelled(write(tmp_path / "e.jsonl", "\n"))
    with pytest.raises(DataError, match="file not found"):
        read_labelled(tmp_path / "missing.tsv")


# -------------------------------------------------------------------------------- splits and views


def test_carved_eval_split_shares_no_text_with_training(quora_sample):
    data = read_labelled(quora_sample / "train.tsv")
    train, evaluation = split_no_shared_text(data, 0.25, seed=3)
    assert len(train) + len(evaluation) == len(data)
    assert 0.15 * len(data) <= len(evaluation) <= 0.25 * len(data)
    assert shared_texts(train, evaluation) == set()
    assert (evaluation.rows["label"] == 1).any()
    again, _ = split_no_shared_text(data, 0.25, seed=3)
    other, _ = split_no_shared_text(data, 0.25, seed=4)
    assert again.rows.equals(train.rows) and not other.rows.equals(train.rows)


def test_split_follows_chains_of_shared_texts_and_group_labels():
    # a-b, b-c link a and c; x-y is separate: only whole chains move to one side
    data = pairs_data([("a", "b", 1), ("b", "c", 0), ("x", "y", 1), ("p", "q", 1)])
    train, evaluation = split_no_shared_text(data, 0.5, seed=0)
    assert shared_texts(train, evaluation) == set()
    assert {"a", "b", "c"} <= set(train.texts()) or {"a", "b", "c"} <= set(evaluation.texts())
    groups = LabelledData(
        "groups",
        pd.DataFrame({"text": ["u", "v", "w", "z"], "label": ["1", "1", "2", "2"], "line": 0}),
        "mem",
    )
    train, evaluation = split_no_shared_text(groups, 0.5)
    assert set(train.rows["label"]).isdisjoint(evaluation.rows["label"])
    one_chain = pairs_data([("a", "b", 1), ("b", "c", 1), ("c", "d", 0)])
    with pytest.raises(DataError, match="cannot carve an evaluation split"):
        split_no_shared_text(one_chain, 0.3)


def test_views_turn_every_layout_into_every_loss_input():
    data = pairs_data([("a", "b", 1), ("b", "c", 1), ("d", "e", 1), ("a", "d", 0)])
    groups = duplicate_groups(data)
    assert groups[0] == groups[1] != groups[2]  # a-b-c chained through b
    mnrl = positive_pairs(data)
    assert mnrl[["anchor", "positive"]].values.tolist() == [["a", "b"], ["b", "c"], ["d", "e"]]
    assert mnrl["group"].iloc[0] == mnrl["group"].iloc[1] != mnrl["group"].iloc[2]
    triplet = text_groups(data)
    label = dict(zip(triplet["text"], triplet["label"], strict=True))
    assert label["a"] == label["c"] != label["e"]
    grouped = LabelledData(
        "groups",
        pd.DataFrame({"text": ["u", "v", "w", "x", "y"], "label": [1, 1, 2, 2, 2], "line": 0}),
        "mem",
    )
    contrastive = labelled_pairs(grouped)
    assert contrastive["label"].sum() == 1 + 3 and (contrastive["label"] == 0).sum() == 4
    assert len(positive_pairs(grouped)) == 4
    rows = LabelledData(
        "triplets",
        pd.DataFrame({"query": ["q1", "q2"], "positive": ["p1", "p2"], "negative": ["n1", "n2"], "line": 0}),
        "mem",
    )
    assert labelled_pairs(rows)["label"].tolist() == [1, 0, 1, 0]
    assert list(positive_pairs(rows).columns) == ["anchor", "positive", "negative", "group"]


# --------------------------------------------------------------------------------- evaluation sets


def test_quora_eval_set_queries_with_first_question_and_leaves_it_out(quora_sample, tiny_bi_encoder):
    data = read_labelled(quora_sample / "test.tsv")
    eval_set = build_eval_set(data)
    retrieval = eval_set.retrieval
    assert len(retrieval.corpus) == len(data.texts())
    first = set(data.rows.loc[data.rows["label"] == 1, "text1"])
    assert set(retrieval.queries["text"]) == first  # the first question of each duplicate pair
    assert all(q in eval_set.exclude[q] for q in retrieval.qrels)
    report = evaluate_labelled(str(tiny_bi_encoder), eval_set, show_progress=False)
    assert all(q not in hits for q, hits in report.retrieval.top_hits.items())
    assert report.retrieval.n_queries == len(retrieval.queries)
    assert 0 < report.metric("MRR@10") <= 1 and 0 < report.metric("pair AP") <= 1
    assert report.classification["pairs"] == len(data)


def test_row_queries_judge_only_their_own_partner(tiny_bi_encoder):
    data = pairs_data(
        [
            ["a cat sat", "the cat sat", 1],
            ["a cat sat", "a cat was sitting", 1],
            ["dogs bark", "dogs are loud", 1],
            ["dogs bark", "cats purr", 0],
        ]
    )
    by_text, by_row = build_eval_set(data), build_eval_set(data, queries="rows")
    assert len(by_text.retrieval.queries) == 2 and len(by_row.retrieval.queries) == 3
    assert len(by_row.retrieval.corpus) == len(by_text.retrieval.corpus) == 6
    ids = dict(zip(by_row.retrieval.corpus.docs["text"], by_row.retrieval.corpus.ids, strict=True))
    assert sorted(by_text.retrieval.qrels[ids["a cat sat"]]) == sorted(
        [ids["the cat sat"], ids["a cat was sitting"]]
    )
    assert [list(j) for j in by_row.retrieval.qrels.values()] == [
        [ids["the cat sat"]],
        [ids["a cat was sitting"]],
        [ids["dogs are loud"]],
    ]
    assert list(by_row.retrieval.queries["text"]) == ["a cat sat", "a cat sat", "dogs bark"]
    report = evaluate_labelled(str(tiny_bi_encoder), by_row, show_progress=False)
    assert report.retrieval.n_queries == 3
    for query, hits in report.retrieval.top_hits.items():  # the query's own text is never retrieved
        assert by_row.query_doc(query) not in hits and len(hits) == 5
    with pytest.raises(ValueError, match="needs labelled pairs"):
        build_eval_set(
            LabelledData("groups", pd.DataFrame({"text": ["x", "y"], "label": [1, 1], "line": 0}), "m"),
            queries="rows",
        )


def test_pair_classification_metrics_at_best_threshold():
    labels = np.array([1, 1, 1, 0, 0, 0])
    separable = classification_metrics(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1]), labels)
    assert separable["accuracy"] == 1 and separable["F1"] == 1 and separable["AP"] == 1
    assert 0.3 <= separable["accuracy_threshold"] <= 0.7
    mixed = classification_metrics(np.array([0.9, 0.2, 0.7, 0.8, 0.1, 0.3]), labels)
    assert mixed["AP"] < 1 and mixed["accuracy"] < 1


def test_prepare_stores_splits_once_and_warns_about_leakage(tmp_path, quora_sample, caplog):
    first = prepare_labelled(quora_sample / "train.tsv", tmp_path, validation_fraction=0.2)
    assert set(first.paths) == {"train", "eval", "validation"} and sum(first.rows.values()) == 1000
    splits = {name: first.load(name) for name in first.paths}
    assert shared_texts(splits["train"], splits["validation"]) == set()
    assert shared_texts(splits["train"], splits["eval"]) == set()
    assert len(first.load("train+validation")) == first.rows["train"] + first.rows["validation"]
    again = prepare_labelled(quora_sample / "train.tsv", tmp_path, validation_fraction=0.2)
    assert again == first
    leaky = write(
        tmp_path / "leaky.tsv",
        "is_duplicate\tquestion1\tquestion2\n"
        + "".join(f"{r.label}\t{r.text1}\t{r.text2}\n" for r in splits["train"].rows.head(5).itertuples()),
    )
    given = prepare_labelled(quora_sample / "train.tsv", tmp_path, eval_file=leaky)
    assert given.shared_texts == 10 and "10 texts are in both" in caplog.text


def test_pairs_without_text_columns_say_which_names_are_expected(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"a": "x", "b": "y", "label": 1}) + "\n")
    with pytest.raises(
        DataError, match=r"line 1: no pair of text columns; expected 'text1', 'text2' or .*found 'a'"
    ):
        read_labelled_pairs(path)
    explicit = read_labelled_pairs(path, text1_field="a", text2_field="b")
    assert explicit.rows[["text1", "text2", "label"]].values.tolist() == [["x", "y", 1]]
