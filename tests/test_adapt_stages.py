"""The GPL stages one by one: query generation, mining, teachers, MarginMSE training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.core.corpus import read_corpus
from tasks.core.store import Store, stage_key
from tasks.text.queries import (
    OfflineGenerator,
    QGenConfig,
    consistency_filter,
    generate_queries,
    split_sentences,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, scifact_sample):
    """The first 48 documents of the shipped SciFact sample, as a JSONL corpus."""
    import json

    corpus = read_corpus(scifact_sample)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as handle:
        for row in corpus.docs.head(48).itertuples():
            handle.write(json.dumps({"_id": row.doc_id, "title": row.title, "text": row.text}) + "\n")
    return read_corpus(path)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_bi_encoder):
    from tasks.core.embeddings import EmbeddingCache
    from tasks.core.models import load_sentence_transformer, resolve_model

    model = load_sentence_transformer(str(tiny_bi_encoder))
    return EmbeddingCache(
        tmp_path_factory.mktemp("ws"),
        model,
        resolve_model(str(tiny_bi_encoder)).fingerprint,
        max_seq_length=64,
    )


# --------------------------------------------------------------------------------- generation


def test_offline_generator_title_ict_and_keyphrases(small_corpus):
    config = QGenConfig(sentences_per_doc=2, keyphrase_queries=1, keep_sentence_probability=0.0)
    generator = OfflineGenerator(config, small_corpus)
    row = small_corpus.docs.iloc[0]
    drafts = generator.generate(row.doc_id, row.title, row.text)
    sources = [d.source for d in drafts]
    assert sources.count("title") == 1 and drafts[0].text == row.title
    assert sources.count("ict") == 2 and sources.count("keyphrase") == 1
    for draft in drafts:
        if draft.source == "ict":  # the sentence is removed from the passage it must retrieve
            assert draft.text in split_sentences(row.text)
            assert draft.positive is not None and draft.text not in draft.positive
            assert draft.positive.startswith(row.title)
    keyphrase = next(d for d in drafts if d.source == "keyphrase").text.split()
    assert 2 <= len(keyphrase) <= 4 and all(
        word.lower() in f"{row.title} {row.text}".lower() for word in keyphrase
    )
    # deterministic per (seed, document)
    assert generator.generate(row.doc_id, row.title, row.text) == drafts
    assert len({d.text.lower() for d in drafts}) == len(drafts)


def test_consistency_filter_keeps_queries_whose_source_ranks_high():
    from tasks.text.queries import DraftQuery

    drafts = [
        (0, DraftQuery("a", "title", None)),
        (1, DraftQuery("b", "ict", "x")),
        (2, DraftQuery("c", "ict", None)),
    ]
    seen = {}

    def ranks(texts, positives, sources):
        seen.update(texts=list(texts), positives=list(positives), sources=list(sources))
        return [0, 5, 2]

    assert [d.text for _, d in consistency_filter(drafts, ranks, top_k=3)] == ["a", "c"]
    assert seen == {"texts": ["a", "b", "c"], "positives": [None, "x", None], "sources": [0, 1, 2]}
    assert consistency_filter(drafts, ranks, top_k=None) == drafts


def test_generated_stage_is_stored_and_reused(tmp_path, small_corpus):
    store = Store(tmp_path)
    config = QGenConfig(part_size=10, consistency_top_k=None)
    key = stage_key("queries", config.model_dump(mode="json"), inputs=[small_corpus.key])
    ref = generate_queries(small_corpus, config, store, key=key)
    queries = store.read_pandas("queries", ref.key)
    assert set(queries["doc_id"]) <= set(small_corpus.ids) and len(set(queries["doc_id"])) > 40
    assert queries["query_id"].is_unique
    assert ref.manifest["kept"] == ref.manifest["generated"] == len(queries)
    assert set(queries["source"]) == {"title", "ict", "keyphrase"}
    # a rerun with the same inputs does no work: it does not even build a generator
    calls = []
    again = generate_queries(small_corpus, config, store, key=key, progress=lambda d, t: calls.append(d))
    assert again.key == ref.key and calls == []


KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tasks.core.corpus import read_corpus
    from tasks.text.queries import QGenConfig, generate_queries
    from tasks.core.store import Store
    corpus = read_corpus({corpus!r})
    config = QGenConfig(part_size=6, consistency_top_k=None)

    def slow(done, total):
        print("part", done, flush=True)
        time.sleep(0.6)

    generate_queries(corpus, config, Store({workspace!r}), key="k", progress=slow)
    print("finished", flush=True)
""")


def test_killed_generation_resumes_and_matches_an_uninterrupted_run(tmp_path, small_corpus):
    """SIGKILL mid-generation; the rerun keeps the finished parts and ends equal to a clean run."""
    config = QGenConfig(part_size=6, consistency_top_k=None)
    clean = Store(tmp_path / "clean")
    expected = clean.read_pandas("queries", generate_queries(small_corpus, config, clean, key="k").key)

    crashed = tmp_path / "crashed"
    script = KILLED_RUN.format(root=str(ROOT), corpus=small_corpus.source, workspace=str(crashed))
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.strip() == "part 3":
            os.kill(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    store = Store(crashed)
    assert not store.is_complete("queries", "k")
    stage = store.path("queries", "k")
    survivors = {p.name: p.stat().st_mtime_ns for p in stage.glob("part-*.parquet")}
    assert 3 <= len(survivors) < 8  # 48 documents / 6 per part = 8 parts; the kill came after part 3

    time.sleep(0.01)
    resumed_parts = []
    ref = generate_queries(
        small_corpus, config, store, key="k", progress=lambda d, t: resumed_parts.append(d)
    )
    # progress counts the finished parts at once, then the rest one by one
    assert resumed_parts == list(range(len(survivors), 9))
    for name, mtime in survivors.items():  # finished parts were not written again
        assert (stage / name).stat().st_mtime_ns == mtime
    got = store.read_pandas("queries", ref.key)
    assert got.equals(expected)
    assert ref.manifest["generated"] == len(expected)


def test_seq2seq_generator_with_a_tiny_t5(tmp_path, small_corpus, tiny_t5):
    from tasks.text.queries import Seq2SeqGenerator

    config = QGenConfig(
        generator=str(tiny_t5),
        queries_per_doc=3,
        max_new_tokens=8,
        batch_size=4,
        part_size=8,
        consistency_top_k=None,
        max_input_tokens=32,
    )
    generator = Seq2SeqGenerator(config)
    assert generator.max_input == 32
    texts = small_corpus.texts()[:5]
    batches = generator.generate_batch(texts, seed=1)
    assert len(batches) == 5
    for queries in batches:
        assert len(queries) <= 3 and len(set(queries)) == len(queries)
        for query in queries:  # at most 8 new tokens per query, so at most 8 words
            assert 0 < len(query.split()) <= 8
    assert generator.generate_batch(texts, seed=1) == batches  # seeded sampling repeats

    store = Store(tmp_path)
    ref = generate_queries(
        small_corpus.__class__(small_corpus.docs.head(8), small_corpus.source), config, store, key="t5"
    )
    queries = store.read_pandas("queries", ref.key)
    assert len(queries) > 0 and set(queries["source"]) == {str(tiny_t5)}
    assert queries["positive"].isna().all()


def test_a_generator_that_is_not_there_fails_clearly(tmp_path, small_corpus):
    from tasks.core.models import ModelNotAvailableError

    config = QGenConfig(generator=str(tmp_path / "no-such-model"), consistency_top_k=None)
    with pytest.raises(ModelNotAvailableError):
        generate_queries(small_corpus, config, Store(tmp_path), key="x")


# ------------------------------------------------------------------------------------- mining


def _queries_frame(corpus, n=12):
    import pandas as pd

    docs = corpus.docs.head(n)
    return pd.DataFrame(
        {
            "query_id": [f"{d}-q1" for d in docs["doc_id"]],
            "doc_id": docs["doc_id"].tolist(),
            "text": docs["title"].tolist(),
        }
    )


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_mined_negatives_exclude_the_positive_and_come_from_the_rank_window(small_corpus, tiny_cache, kind):
    from tasks.core.index import INDEX_CLASSES, ann_index, index_kind
    from tasks.text.negatives import MineConfig, mine_negatives

    doc_vectors = tiny_cache.embed(small_corpus.texts())
    queries = _queries_frame(small_corpus)
    query_vectors = tiny_cache.embed(queries["text"].tolist())
    config = MineConfig(retrievers=["dense"], candidates=6, rank_min=1, num_negatives=3, index=kind)
    index = ann_index(doc_vectors, config)
    # the name a mining stage's manifest records without building the index (on a cluster)
    assert type(index).__name__ == INDEX_CLASSES[index_kind(len(doc_vectors), config)]
    table = mine_negatives(queries, small_corpus.ids, doc_vectors, query_vectors, index, config)
    assert table.num_rows == len(queries)
    for row, record in enumerate(table.to_pylist()):
        assert record["pos_id"] == queries["doc_id"][row]
        assert len(record["neg_ids"]) == 3 and record["pos_id"] not in record["neg_ids"]
        if kind == "exact":  # ranks 1..6 among the documents other than the positive
            scores = doc_vectors @ query_vectors[row]
            ranked = [
                small_corpus.ids[i] for i in np.argsort(-scores) if small_corpus.ids[i] != record["pos_id"]
            ]
            assert set(record["neg_ids"]) <= set(ranked[1:7])
            expected = [
                float(doc_vectors[small_corpus.ids.index(n)] @ query_vectors[row]) for n in record["neg_ids"]
            ]
            assert np.allclose(record["neg_scores"], expected, atol=1e-5)


def test_mining_with_bm25_and_dense_together(small_corpus, tiny_cache):
    from tasks.core.bm25 import BM25Index
    from tasks.core.index import ann_index
    from tasks.text.negatives import MineConfig, mine_negatives

    doc_vectors = tiny_cache.embed(small_corpus.texts())
    queries = _queries_frame(small_corpus)
    bm25 = BM25Index(small_corpus.texts())
    config = MineConfig(retrievers=["bm25"], candidates=3, num_negatives=3)
    table = mine_negatives(
        queries,
        small_corpus.ids,
        doc_vectors,
        tiny_cache.embed(queries["text"].tolist()),
        ann_index(doc_vectors, config),
        config,
        bm25=bm25,
    )
    positions, _ = bm25.search(queries["text"].tolist(), 4)
    for row, record in enumerate(table.to_pylist()):
        top = [small_corpus.ids[p] for p in positions[row] if small_corpus.ids[p] != record["pos_id"]][:3]
        assert sorted(record["neg_ids"]) == sorted(top)
    with pytest.raises(ValueError, match="BM25"):
        mine_negatives(
            queries,
            small_corpus.ids,
            doc_vectors,
            tiny_cache.embed(queries["text"].tolist()),
            ann_index(doc_vectors, config),
            config,
        )


# ------------------------------------------------------------------------------------ teachers


def test_offline_teacher_pair_scores_agree_with_its_ranking(small_corpus, tiny_cache):
    from tasks.core.bm25 import BM25Index
    from tasks.text.teachers import OfflineTeacher

    doc_vectors = tiny_cache.embed(small_corpus.texts())
    teacher = OfflineTeacher(
        BM25Index(small_corpus.texts()), tiny_cache, doc_vectors, bm25_weight=0.5, pool=10
    )
    queries = small_corpus.docs["title"].head(5).tolist()
    rows = teacher.rank_rows(queries)
    assert rows.shape == (5, len(small_corpus))
    docs = small_corpus.texts()
    for i, query in enumerate(queries):
        pairs = teacher.score([query] * 4, docs[:4])
        assert pairs.dtype == np.float32
        assert np.allclose(pairs, rows[i, :4], atol=1e-3)
    # weight 1 is pure BM25 (z-scored), so the order equals BM25's order
    pure = OfflineTeacher(teacher.bm25, tiny_cache, doc_vectors, bm25_weight=1.0, pool=10)
    bm25_order = np.argsort(-teacher.bm25.all_scores(teacher.bm25.query_ids([queries[0]])[0]), kind="stable")
    assert np.array_equal(np.argsort(-pure.rank_rows([queries[0]])[0], kind="stable"), bm25_order)


def test_cross_encoder_teacher_gives_raw_logits_and_margins(tiny_cross_encoder):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tasks.text.pseudo_labels import label_triples
    from tasks.text.teachers import CrossEncoderTeacher

    teacher = CrossEncoderTeacher(str(tiny_cross_encoder), batch_size=2, max_length=64)
    queries, passages = (
        ["what is dna", "what is dna", "heart attack"],
        ["dna is a molecule", "cats", "the heart"],
    )
    scores = teacher.score(queries, passages)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    with torch.no_grad():
        logits = (
            model(
                **tokenizer(
                    queries, passages, padding=True, truncation=True, max_length=64, return_tensors="pt"
                )
            )
            .logits[:, 0]
            .numpy()
        )
    assert scores.dtype == np.float32 and np.allclose(scores, logits, atol=1e-5)  # no sigmoid

    negatives = pa.table(
        {"query_id": ["q1"], "pos_id": ["d1"], "neg_ids": [["d2", "d3"]], "neg_scores": [[0.1, 0.2]]}
    )
    texts = {"d1": "dna is a molecule", "d2": "cats", "d3": "the heart"}
    labels = label_triples(
        negatives, lambda q: "what is dna", lambda q: texts["d1"], texts.__getitem__, teacher
    )
    assert labels.column("neg_id").to_pylist() == ["d2", "d3"]
    margin = np.asarray(labels.column("margin").to_pylist())
    pos = teacher.score(["what is dna"], [texts["d1"]])[0]
    neg = teacher.score(["what is dna"] * 2, ["cats", "the heart"])
    assert np.allclose(margin, pos - neg, atol=1e-5)


# ------------------------------------------------------------------------------------ training


def _rows(corpus, n=24):
    from finetune.marginmse import TrainingRows

    texts = corpus.texts()
    rng = np.random.default_rng(0)
    rows = TrainingRows([], [], [], [])
    for i in range(n):
        rows.queries.append(corpus.docs["title"].iat[i])
        rows.positives.append(texts[i])
        negs = [texts[j] for j in rng.choice([j for j in range(len(texts)) if j != i], size=3, replace=False)]
        rows.negatives.append(negs)
        rows.margins.append([5.0, 4.0, 3.0])
    return rows


@pytest.mark.slow
def test_marginmse_training_resumes_after_a_crash(tmp_path, small_corpus, tiny_bi_encoder):
    from finetune.marginmse import TrainConfig, train_marginmse
    from tasks.core.models import load_sentence_transformer

    rows = _rows(small_corpus)
    config = TrainConfig(
        max_steps=4,
        batch_size=4,
        negatives_per_query=2,
        save_steps=1,
        eval_steps=1,
        logging_steps=1,
        max_seq_length=32,
        learning_rate=1e-3,
        eval_fraction=0.2,
        eval_max_rows=4,
    )

    def crash(step, total):
        if step == 3:
            raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        train_marginmse(str(tiny_bi_encoder), rows, config, tmp_path / "run", progress=crash)
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "model").exists()

    steps_seen = []
    result = train_marginmse(
        str(tiny_bi_encoder),
        rows,
        config,
        tmp_path / "run",
        progress=lambda step, total: steps_seen.append(step),
    )
    assert result.resumed_from.endswith("checkpoint-2") and result.steps == 4
    assert steps_seen == [3, 4]  # only the steps the crash lost
    assert result.eval_rows == 4 and result.label_scale > 0  # 20% of 24 rows, capped at 4
    series = result.loss_series()
    assert [s for s, _ in series["train loss"]][-1] == 4 and series["held-out loss"]
    trained = load_sentence_transformer(str(result.model_dir))
    base = load_sentence_transformer(str(tiny_bi_encoder))
    text = [rows.queries[0]]
    assert not np.allclose(trained.encode(text), base.encode(text))  # the weights moved

    again = train_marginmse(
        str(tiny_bi_encoder),
        rows,
        config,
        tmp_path / "run",
        progress=lambda step, total: pytest.fail("a finished run must not train again"),
    )
    assert again.steps == 4 and again.model_dir == result.model_dir


def test_query_side_training_fits_the_margins_against_fixed_passages(tmp_path, small_corpus, tiny_bi_encoder):
    from finetune.marginmse import TrainConfig, train_query_side
    from tasks.core.models import load_sentence_transformer

    rows = _rows(small_corpus)
    base = load_sentence_transformer(str(tiny_bi_encoder))
    base.max_seq_length = 32
    fixed = {
        t: v
        for t, v in zip(
            small_corpus.texts(), base.encode(small_corpus.texts(), normalize_embeddings=True), strict=True
        )
    }
    asked = []

    def passages(texts):
        asked.extend(texts)
        return np.stack([fixed[t] for t in texts])

    def mse(model):
        q = model.encode(rows.queries, normalize_embeddings=True)
        pos, negs = passages(rows.positives), [passages(n[:2]) for n in rows.negatives]
        student = np.stack([q[i] @ pos[i] - negs[i] @ q[i] for i in range(len(rows))])
        return float(((student - 0.02 * np.asarray(rows.margins)[:, :2]) ** 2).mean())

    config = TrainConfig(
        max_steps=30,
        batch_size=8,
        negatives_per_query=2,
        max_seq_length=32,
        learning_rate=3e-3,
        label_scale=0.02,
        warmup_ratio=0.0,
    )
    before = mse(base)
    result = train_query_side(str(tiny_bi_encoder), rows, passages, config, tmp_path / "run")
    trained = load_sentence_transformer(str(result.model_dir))
    trained.max_seq_length = 32
    assert result.steps == 30 and mse(trained) < 0.5 * before  # it learned the teacher's margins
    # passages only ever came from the fixed vectors: no passage was encoded by the student
    assert set(asked) <= set(fixed)
    again = train_query_side(
        str(tiny_bi_encoder), rows, lambda t: pytest.fail("done: no work"), config, tmp_path / "run"
    )
    assert again.model_dir == result.model_dir


def test_label_scale_is_the_least_squares_slope():
    from finetune.marginmse import fit_label_scale

    teacher = np.array([10.0, 20.0, -5.0])
    assert fit_label_scale(0.02 * teacher, teacher) == pytest.approx(0.02)
    assert fit_label_scale(-teacher, teacher) == 1.0  # a student that disagrees keeps the raw scale
