"""Listwise query-side training, candidate lists, the per-corpus BM25 weight and hybrid retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.listwise import (
    CandidateLists,
    JudgedListwiseConfig,
    ListwiseConfig,
    listwise_loss,
    train_listwise,
)
from tasks.core.corpus import read_corpus
from tasks.core.hybrid import hybrid_rows, pool_stats, run_from_rows
from tasks.text.fusion import choose_weight, make_probes, probe_ndcg, probe_rows
from tasks.text.lists import choose_candidates
from tasks.text.queries import OfflineGenerator, QGenConfig, word_spans


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, scifact_sample):
    corpus = read_corpus(scifact_sample)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as handle:
        for row in corpus.docs.head(40).itertuples():
            handle.write(json.dumps({"_id": row.doc_id, "title": row.title, "text": row.text}) + "\n")
    return read_corpus(path)


@pytest.fixture(scope="module")
def fixed_docs(small_corpus, tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer

    model = load_sentence_transformer(str(tiny_bi_encoder))
    model.max_seq_length = 64
    return model.encode(small_corpus.texts(), normalize_embeddings=True)


def _lists(corpus, docs, n=24):
    """Title queries whose teacher prefers, in order, the document the title belongs to and then
    two fixed others: an order the tiny student does not know."""
    rng = np.random.default_rng(0)
    queries, candidates, scores = [], [], []
    for i in range(n):
        others = rng.choice([j for j in range(len(docs)) if j != i], size=5, replace=False)
        queries.append(corpus.docs["title"].iat[i])
        candidates.append([i, *others])
        scores.append([3.0, 1.0, 0.5, -1.0, -1.0, -1.0])
    return CandidateLists(queries, np.asarray(candidates), np.asarray(scores, dtype=np.float32))


def _kl(model, lists, docs, config):
    import torch

    with torch.no_grad():
        q = model.encode(lists.queries, normalize_embeddings=True, convert_to_tensor=True)
        student = torch.einsum("bd,bkd->bk", q, torch.from_numpy(docs[lists.candidates]))
        return float(
            listwise_loss(
                student,
                torch.from_numpy(lists.scores),
                config.student_temperature,
                config.teacher_temperature,
            )
        )


def test_listwise_loss_is_zero_when_the_student_matches_and_positive_otherwise():
    import torch

    teacher = torch.tensor([[2.0, 1.0, 0.0]])
    same = teacher * 0.05  # student cosines that give the same softmax at temperature 0.05
    assert float(listwise_loss(same, teacher, 0.05, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(listwise_loss(same.flip(-1), teacher, 0.05, 1.0)) > 0.1


def test_listwise_training_learns_the_teachers_order(tmp_path, small_corpus, fixed_docs, tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer

    lists = _lists(small_corpus, fixed_docs)
    config = ListwiseConfig(
        max_steps=30,
        batch_size=8,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_seq_length=32,
        logging_steps=5,
        average_with_start=0.0,
        time_budget_minutes=None,
    )
    base = load_sentence_transformer(str(tiny_bi_encoder))
    base.max_seq_length = 32
    before = _kl(base, lists, fixed_docs, config)
    result = train_listwise(str(tiny_bi_encoder), lists, fixed_docs, config, tmp_path / "run")
    trained = load_sentence_transformer(str(result.model_dir))
    trained.max_seq_length = 32
    assert result.steps == 30 and _kl(trained, lists, fixed_docs, config) < 0.5 * before
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    # a finished run does no work
    again = train_listwise(
        str(tiny_bi_encoder),
        lists,
        fixed_docs,
        config,
        tmp_path / "run",
        progress=lambda *a: pytest.fail("a finished run must not train again"),
    )
    assert again.steps == 30


@pytest.mark.parametrize("judged", [False, True], ids=["teacher", "teacher+judged"])
def test_listwise_training_resumes_after_a_kill_to_the_same_weights(
    tmp_path, small_corpus, fixed_docs, tiny_bi_encoder, judged
):
    import torch

    from tasks.core.models import load_sentence_transformer

    lists = _lists(small_corpus, fixed_docs)
    settings = {}
    if judged:  # the judged queries' path: the contrastive term on the first document of each list
        lists.relevance = np.zeros(lists.candidates.shape, dtype=np.int8)
        lists.relevance[:, 0] = 1
        settings = {"label_weight": 1.0}
    config = (JudgedListwiseConfig if judged else ListwiseConfig)(
        **settings,
        max_steps=6,
        batch_size=8,
        learning_rate=1e-3,
        save_steps=2,
        logging_steps=1,
        max_seq_length=32,
        time_budget_minutes=None,
    )
    straight = train_listwise(str(tiny_bi_encoder), lists, fixed_docs, config, tmp_path / "straight")

    def kill(step, total):
        if step == 5:
            raise KeyboardInterrupt("power cut")

    with pytest.raises(KeyboardInterrupt):
        train_listwise(str(tiny_bi_encoder), lists, fixed_docs, config, tmp_path / "cut", progress=kill)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "progress.json").read_text())["step"] == 4
    assert not (tmp_path / "cut" / "model").exists()
    seen = []
    resumed = train_listwise(
        str(tiny_bi_encoder),
        lists,
        fixed_docs,
        config,
        tmp_path / "cut",
        progress=lambda step, total: seen.append(step),
    )
    assert seen == [5, 6] and resumed.resumed_from and resumed.steps == 6
    assert not (tmp_path / "cut" / "checkpoint").exists()
    a = load_sentence_transformer(str(straight.model_dir)).state_dict()
    b = load_sentence_transformer(str(resumed.model_dir)).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history])


def test_weight_averaging_lands_between_the_start_and_the_trained_model(
    tmp_path, small_corpus, fixed_docs, tiny_bi_encoder
):
    import torch

    from tasks.core.models import load_sentence_transformer

    lists = _lists(small_corpus, fixed_docs)
    settings = {"max_steps": 4, "batch_size": 8, "learning_rate": 3e-3, "max_seq_length": 32}
    plain = train_listwise(
        str(tiny_bi_encoder),
        lists,
        fixed_docs,
        ListwiseConfig(**settings, average_with_start=0.0),
        tmp_path / "plain",
    )
    mixed = train_listwise(
        str(tiny_bi_encoder),
        lists,
        fixed_docs,
        ListwiseConfig(**settings, average_with_start=0.25),
        tmp_path / "mixed",
    )
    start = load_sentence_transformer(str(tiny_bi_encoder)).state_dict()
    end = load_sentence_transformer(str(plain.model_dir)).state_dict()
    mid = load_sentence_transformer(str(mixed.model_dir)).state_dict()
    key = next(k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, end[k]))
    assert torch.allclose(mid[key], 0.25 * start[key] + 0.75 * end[key], atol=1e-6)


def test_frozen_layers_do_not_move(tmp_path, small_corpus, fixed_docs, tiny_bi_encoder):
    import torch

    from tasks.core.models import load_sentence_transformer

    lists = _lists(small_corpus, fixed_docs)
    config = ListwiseConfig(max_steps=3, batch_size=8, learning_rate=3e-3, max_seq_length=32, freeze_layers=1)
    result = train_listwise(str(tiny_bi_encoder), lists, fixed_docs, config, tmp_path / "run")
    start = load_sentence_transformer(str(tiny_bi_encoder)).state_dict()
    end = load_sentence_transformer(str(result.model_dir)).state_dict()
    frozen = [k for k in start if ".embeddings." in k or ".layer.0." in k]
    moved = [k for k in start if ".layer.1." in k and start[k].is_floating_point()]
    assert frozen and all(torch.equal(start[k], end[k]) for k in frozen)
    assert any(not torch.equal(start[k], end[k]) for k in moved)


def test_candidate_lists_hold_the_teachers_best_then_random_others():
    rows = np.array([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    positions, scores = choose_candidates(rows, top=2, sampled=2, rng=np.random.default_rng(0))
    assert positions[0, :2].tolist() == [1, 4] and positions[1, :2].tolist() == [0, 1]
    for row, pos in enumerate(positions):
        assert len(set(pos)) == 4 and not set(pos[2:]) & set(pos[:2])
        assert np.allclose(scores[row], rows[row, pos])
    tiny, _ = choose_candidates(rows[:, :3], top=2, sampled=4, rng=np.random.default_rng(0))
    assert tiny.shape == (2, 6)  # a corpus smaller than a list repeats documents to the common width


# ------------------------------------------------------------------------------ hybrid and weight


def test_hybrid_rows_mix_per_query_z_scores():
    dense = np.array([[0.9, 0.5, 0.1, 0.0]], dtype=np.float32)
    lexical = np.array([[0.0, 1.0, 8.0, 0.0]], dtype=np.float32)
    assert np.argmax(hybrid_rows(dense, lexical, 0.0, pool=10)) == 0  # dense only
    assert np.argmax(hybrid_rows(dense, lexical, 1.0, pool=10)) == 2  # BM25 only
    stats = pool_stats(dense, lexical, pool=10)
    assert stats[0, 0] == pytest.approx(lexical.mean()) and stats[0, 3] == pytest.approx(
        dense.std(), rel=1e-4
    )
    run = run_from_rows(hybrid_rows(dense, lexical, 0.5, pool=10), ["a", "b", "c", "d"], ["q"], top_k=2)
    by_hand = 0.5 * (lexical - lexical.mean()) / lexical.std() + 0.5 * (dense - dense.mean()) / dense.std()
    assert list(run["q"]) == [["a", "b", "c", "d"][i] for i in np.argsort(-by_hand[0])[:2]] == ["c", "a"]
    skipped = run_from_rows(dense, ["a", "b", "c", "d"], ["a"], top_k=2, exclude={"a": {"a"}})
    assert "a" not in skipped["a"] and len(skipped["a"]) == 2


def test_weight_choice_follows_the_retriever_that_finds_the_probes():
    """Probes whose source only BM25 finds pull the weight up; ones only the dense side finds, down."""
    rng = np.random.default_rng(0)
    n, docs = 60, 50
    sources = rng.integers(0, docs, size=n)
    noise_dense, noise_lexical = rng.normal(size=(n, docs)), rng.normal(size=(n, docs))
    helpful = noise_lexical.copy()
    helpful[np.arange(n), sources] += 4.0  # BM25 puts the source first
    lexical_wins = choose_weight(noise_dense, helpful, sources, default=0.3)
    assert lexical_wins.weight > 0.3 and lexical_wins.best >= 0.6 and lexical_wins.t > 2
    helpful_dense = noise_dense.copy()
    helpful_dense[np.arange(n), sources] += 4.0
    dense_wins = choose_weight(helpful_dense, noise_lexical, sources, default=0.3)
    assert dense_wins.weight < 0.3 and dense_wins.best == 0.0
    # no signal either way: the default stays
    flat = choose_weight(noise_dense, noise_lexical, sources, default=0.3)
    assert abs(flat.weight - 0.3) <= 0.1
    assert choose_weight(noise_dense[:0], noise_lexical[:0], [], default=0.3).weight == 0.3
    assert probe_ndcg(helpful_dense, noise_lexical, sources, 0.0).mean() > 0.95 > flat.ndcg["0"]


def test_probes_score_the_positive_in_place_of_the_source(small_corpus, fixed_docs):
    from tasks.core.bm25 import BM25Index

    generator = OfflineGenerator(QGenConfig(), small_corpus)
    probes = make_probes(small_corpus, range(10), generator, limit=12)
    assert 0 < len(probes) <= 12 and set(probes.sources) <= set(range(10))
    texts = small_corpus.texts()
    for text, source, positive in zip(probes.texts, probes.sources, probes.positives, strict=True):
        assert text not in positive and positive != texts[source]  # the query's words are taken out
    bm25 = BM25Index(texts)
    queries = np.eye(len(probes), fixed_docs.shape[1], dtype=np.float32)
    positives = np.roll(queries, 1, axis=1)
    dense, lexical = probe_rows(probes, bm25, queries, positives, fixed_docs)
    rows = np.arange(len(probes)), np.asarray(probes.sources)
    assert np.allclose(dense[rows], 0.0)  # q . positive, not q . document
    assert np.allclose(lexical[rows], bm25.score_pairs(probes.texts, probes.positives))


def test_text_without_sentence_ends_gets_word_span_queries():
    spans = word_spans(" ".join(f"w{i}" for i in range(28)), 12)
    assert [len(s.split()) for s in spans] == [12, 16]  # the short tail joins the span before it
    text = "compact memories have flexible capacities a digital data storage system with capacity up to bits and random access is described in detail here"

    class One:  # a one-document corpus: the generator reads its texts and size
        def texts(self):
            return [text]

        def __len__(self):
            return 1

    drafts = OfflineGenerator(QGenConfig(), One()).generate("1", "", text)
    ict = [d for d in drafts if d.source == "ict"]
    assert ict and ict[0].text in text and ict[0].text not in ict[0].positive


def test_adapt_text_on_a_collection_whose_queries_are_documents_and_whose_judgments_name_empty_ones(
    prefect_harness, tmp_path, scifact_sample, tiny_bi_encoder
):
    """ArguAna's quirk (queries are corpus documents under the same id) and an empty document the
    judgments name: both counted in the report, neither fatal, and no query retrieves itself."""
    from flows.adapt_text import AdaptTextConfig, adapt_text_flow
    from tasks.core.registry import Registry

    corpus = read_corpus(scifact_sample).docs.head(40)
    folder = tmp_path / "argue"
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as out:
        for row in corpus.itertuples():
            out.write(json.dumps({"_id": row.doc_id, "title": row.title, "text": row.text}) + "\n")
        out.write(json.dumps({"_id": "empty-1", "title": "", "text": "   "}) + "\n")
    queries = corpus.head(6)
    with (folder / "queries.jsonl").open("w") as out:
        for row in queries.itertuples():  # each query is a document of the corpus, under its id
            out.write(json.dumps({"_id": row.doc_id, "text": f"{row.title} {row.text}"}) + "\n")
    ids = list(corpus["doc_id"])
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{ids[(i + 7) % len(ids)]}\t1" for i, q in enumerate(queries["doc_id"])]
    lines.append(f"{queries['doc_id'].iat[0]}\tempty-1\t1")
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    config = AdaptTextConfig.model_validate(
        {
            "corpus": str(folder),
            "eval": str(folder),
            "workspace": str(tmp_path / "ws"),
            "base_model": str(tiny_bi_encoder),
            "encode_backend": "pytorch",
            "mine": {"max_seq_length": 48},
            "eval_max_seq_length": 48,
            "lists": {"top": 6, "sampled": 2},
            "listwise": {"max_steps": 2, "batch_size": 4, "max_seq_length": 32},
        }
    )
    report = adapt_text_flow(config)
    assert report["identical_id_queries"] == 6 and report["dropped_judgments"] == 1
    assert report["left_out_documents"] == 1
    assert "6 queries share an id with a document" in report["markdown"]
    assert "1 judgment(s) naming a left-out document" in report["markdown"]
    for example in report["examples"]:  # a query never finds itself, though its text is that document
        found = {h["doc_id"] for h in example["before"] + example["after"]}
        assert example["query_id"] not in found

    # the same in both retrieval modes, straight from the evaluation functions
    from tasks.core.bm25 import BM25Index
    from tasks.core.corpus import read_judged_queries
    from tasks.core.embeddings import EmbeddingCache
    from tasks.core.evaluation import evaluate_cached, evaluate_hybrid, identical_ids
    from tasks.core.models import load_sentence_transformer

    data = read_judged_queries(folder, "test", read_corpus(folder))
    cache = EmbeddingCache(
        tmp_path / "ws2", load_sentence_transformer(str(tiny_bi_encoder)), "tiny", max_seq_length=48
    )
    exclude = identical_ids(data)
    bm25 = BM25Index(data.corpus.texts())
    for run in (
        evaluate_cached(cache, data, "dense", exclude=exclude),
        evaluate_hybrid(cache, cache, data, bm25, 0.5, "hybrid", exclude=exclude),
    ):
        assert all(q not in hits for q, hits in run.top_hits.items()) and len(run.top_hits) == 6
    themselves = evaluate_hybrid(cache, cache, data, bm25, 0.5, "hybrid")
    assert all(hits[0] == q for q, hits in themselves.top_hits.items())  # what the exclusion prevents
    card = Registry(tmp_path / "ws").card("text-retriever", "v0001")
    assert card["metrics_before"]["Recall@100"] > 0  # the relevant documents are reachable
