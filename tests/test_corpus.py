import json

import pandas as pd
import pytest

from tasks.core.corpus import DataError, read_beir, read_corpus, read_qrels, read_queries
from tasks.core.products import read_catalog


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def jsonl(rows):
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_beir_sample_reads_into_the_corpus_contract(scifact_sample):
    data = read_beir(scifact_sample)
    assert len(data.corpus) == 800 and len(data.queries) == 200
    assert list(data.corpus.docs.columns[:5]) == ["doc_id", "title", "text", "image", "content_hash"]
    assert data.corpus.docs["doc_id"].is_unique
    assert set(data.qrels) == set(data.queries["query_id"])
    assert all(d in set(data.corpus.ids) for docs in data.qrels.values() for d in docs)


def test_content_hash_follows_the_content_only(tmp_path):
    a = read_corpus(
        write(
            tmp_path / "a.jsonl", jsonl([{"_id": "1", "title": "T", "text": "x"}, {"_id": "2", "text": "y"}])
        )
    )
    b = read_corpus(
        write(
            tmp_path / "b.jsonl", jsonl([{"_id": "1", "title": "T", "text": "x"}, {"_id": "2", "text": "z"}])
        )
    )
    assert a.docs["content_hash"][0] == b.docs["content_hash"][0]
    assert a.docs["content_hash"][1] != b.docs["content_hash"][1]
    assert a.key != b.key


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"_id": "1", "text": "ok"}\n{"_id": "2", "text": \n')
    with pytest.raises(DataError) as info:
        read_corpus(path)
    assert info.value.line == 2 and str(path) in str(info.value) and "malformed JSON" in str(info.value)


def test_non_object_line(tmp_path):
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        read_corpus(write(tmp_path / "c.jsonl", '["a", "b"]\n'))


def test_missing_id_and_missing_text_field(tmp_path):
    with pytest.raises(DataError, match="line 2: no document id"):
        read_corpus(write(tmp_path / "a.jsonl", jsonl([{"_id": "1", "text": "a"}, {"text": "b"}])))
    with pytest.raises(DataError, match="line 2: no document text"):
        read_corpus(
            write(tmp_path / "b.jsonl", jsonl([{"_id": "1", "text": "a"}, {"_id": "2", "title": "b"}]))
        )
    with pytest.raises(DataError, match="line 1: field '_id' .* is empty"):
        read_corpus(write(tmp_path / "c.jsonl", jsonl([{"_id": " ", "text": "a"}])))


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write(
        tmp_path / "c.jsonl",
        jsonl([{"_id": "7", "text": "a"}, {"_id": "8", "text": "b"}, {"_id": "7", "text": "c"}]),
    )
    with pytest.raises(DataError, match=r"line 3: duplicate document id '7' \(first at line 1\)"):
        read_corpus(path)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"_id": "1", "text": "fine"}\n{"_id": "2", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2: bytes that are not UTF-8"):
        read_corpus(path)


def test_empty_documents_are_reported_and_left_out(tmp_path, caplog):
    path = write(
        tmp_path / "c.jsonl",
        jsonl(
            [{"_id": "1", "text": "a"}, {"_id": "2", "title": "", "text": "  "}, {"_id": "3", "text": "c"}]
        ),
    )
    corpus = read_corpus(path)
    assert corpus.ids == ["1", "3"]
    assert [(s.doc_id, s.line) for s in corpus.skipped] == [("2", 2)]
    assert "left out 1 record" in caplog.text


def test_only_empty_documents_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no usable documents"):
        read_corpus(write(tmp_path / "c.jsonl", jsonl([{"_id": "1", "text": ""}])))


def test_csv_tsv_and_parquet_corpora(tmp_path):
    csv_corpus = read_corpus(
        write(tmp_path / "c.csv", 'doc_id,title,text\n1,Title,"multi\nline, with comma"\n2,,plain\n')
    )
    assert csv_corpus.ids == ["1", "2"] and csv_corpus.docs["text"][0] == "multi\nline, with comma"
    tsv_corpus = read_corpus(write(tmp_path / "c.tsv", "id\ttext\nA\tone\nB\ttwo\n"))
    assert tsv_corpus.ids == ["A", "B"]
    pd.DataFrame({"id": ["x", "y"], "body": ["first", "second"]}).to_parquet(tmp_path / "c.parquet")
    parquet_corpus = read_corpus(tmp_path / "c.parquet")
    assert parquet_corpus.ids == ["x", "y"] and parquet_corpus.texts() == ["first", "second"]
    mapped = read_corpus(
        write(tmp_path / "m.csv", "key,words\nk1,hello\n"), id_field="key", text_field="words"
    )
    assert mapped.ids == ["k1"]


def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    path = write(tmp_path / "c.csv", 'id,text\n1,"two\nlines"\n2,a,extra\n')
    with pytest.raises(DataError, match="line 4: expected 2 fields"):
        read_corpus(path)


def test_parquet_errors_name_the_row(tmp_path):
    pd.DataFrame({"id": ["x", "x"], "text": ["a", "b"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="row 2: duplicate document id"):
        read_corpus(tmp_path / "d.parquet")
    write(tmp_path / "bad.parquet", b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_corpus(tmp_path / "bad.parquet")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown file type"):
        read_corpus(write(tmp_path / "c.xml", "<x/>"))
    with pytest.raises(DataError, match="file not found"):
        read_corpus(tmp_path / "none.jsonl")


def test_queries_errors(tmp_path):
    assert read_queries(write(tmp_path / "q.jsonl", jsonl([{"_id": "q1", "text": "what"}])))[
        "query_id"
    ].tolist() == ["q1"]
    with pytest.raises(DataError, match="line 2: duplicate query id 'q1'"):
        read_queries(
            write(tmp_path / "d.jsonl", jsonl([{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]))
        )
    with pytest.raises(DataError, match="line 1: field 'text' is empty"):
        read_queries(write(tmp_path / "e.jsonl", jsonl([{"_id": "q1", "text": None}])))


def test_qrels_naming_unknown_ids_or_malformed(tmp_path):
    good = "query-id\tcorpus-id\tscore\nq1\td1\t1\n"
    assert read_qrels(write(tmp_path / "ok.tsv", good)) == {"q1": {"d1": 1}}
    with pytest.raises(DataError, match="line 3: corpus id 'd9' is not in the corpus"):
        read_qrels(write(tmp_path / "a.tsv", good + "q1\td9\t1\n"), doc_ids={"d1"})
    with pytest.raises(DataError, match="line 2: query id 'q1' is not among the queries"):
        read_qrels(write(tmp_path / "b.tsv", good), query_ids={"q2"})
    with pytest.raises(DataError, match="line 2: score 'high' is not a number"):
        read_qrels(write(tmp_path / "c.tsv", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n"))
    with pytest.raises(DataError, match="line 2: expected 3 tab-separated fields"):
        read_qrels(write(tmp_path / "d.tsv", "query-id\tcorpus-id\tscore\nq1 d1 1\n"))


def test_beir_folder_errors(tmp_path, scifact_sample):
    with pytest.raises(DataError, match="expected a BEIR folder"):
        read_beir(tmp_path / "missing")
    with pytest.raises(DataError, match="no judgments for split 'dev'; available splits: \\['test'\\]"):
        read_beir(scifact_sample, split="dev")


def test_beir_drops_judgments_of_left_out_empty_documents(tmp_path):
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    write(folder / "corpus.jsonl", jsonl([{"_id": "d1", "text": "alpha"}, {"_id": "d2", "text": ""}]))
    write(folder / "queries.jsonl", jsonl([{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "beta?"}]))
    write(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    data = read_beir(folder)
    assert data.qrels == {"q1": {"d1": 1}} and data.queries["query_id"].tolist() == ["q1"]


def test_catalog_sample_with_images_and_attributes(fashion_sample):
    catalog = read_catalog(fashion_sample / "styles.csv")
    assert len(catalog) == 400
    first = catalog.docs.iloc[0]
    assert first["image"].endswith(".jpg") and first["title"]
    attributes = json.loads(first["attributes"])
    assert {"gender", "articleType", "baseColour"} <= set(attributes)
    assert attributes["articleType"] in first["text"]


def test_catalog_missing_image_is_an_error_or_skipped(tmp_path, fashion_sample):
    rows = (fashion_sample / "styles.csv").read_text().splitlines()[:3]
    header, good, bad = rows[0], rows[1], rows[2]
    bad_fields = bad.split(",")
    bad_fields[-1] = "nope.jpg"
    path = write(tmp_path / "styles.csv", "\n".join([header, good, ",".join(bad_fields)]) + "\n")
    with pytest.raises(DataError, match="line 3: image file 'nope.jpg' not found"):
        read_catalog(path, image_root=fashion_sample / "images")
    catalog = read_catalog(path, image_root=fashion_sample / "images", missing_image="skip")
    assert len(catalog) == 1 and catalog.skipped[0].reason.startswith("image file 'nope.jpg'")


def test_catalog_content_hash_follows_the_image_bytes(tmp_path, fashion_sample):
    header, row = (fashion_sample / "styles.csv").read_text().splitlines()[:2]
    image = row.split(",")[-1]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / image).write_bytes((fashion_sample / "images" / image).read_bytes())
    path = write(tmp_path / "styles.csv", f"{header}\n{row}\n")
    before = read_catalog(path).docs["content_hash"][0]
    (tmp_path / "images" / image).write_bytes((fashion_sample / "images" / image).read_bytes() + b"\0")
    assert read_catalog(path).docs["content_hash"][0] != before


def test_catalog_unknown_columns(tmp_path, fashion_sample):
    path = write(tmp_path / "styles.csv", "sku,name\n1,x\n")
    with pytest.raises(DataError, match="line 2: no 'id' column"):
        read_catalog(path)
    header, row = (fashion_sample / "styles.csv").read_text().splitlines()[:2]
    path = write(tmp_path / "s2.csv", f"{header}\n{row}\n")
    with pytest.raises(DataError, match=r"text field\(s\) \['colour'\] not among the columns"):
        read_catalog(path, text_fields=["colour"], image_root=fashion_sample / "images")
