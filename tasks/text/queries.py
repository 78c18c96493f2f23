"""Query generation: synthetic queries for every document of a corpus.

Two generators share one output table (``query_id, doc_id, text, source`` + ``positive``, the
passage the query was made from when it differs from the document):

* :class:`Seq2SeqGenerator` — a doc2query model (T5 family, e.g.
  BeIR/query-gen-msmarco-t5-base-v1) sampling N queries per document (top-p 0.95, top-k 25,
  64 new tokens as in GPL), duplicates per document removed, inputs batched by length and
  truncated to the model's input limit.
* :class:`OfflineGenerator` — needs no model; see its docstring.

Work is written to the store in parts of ``part_size`` documents, so a crash resumes at the last
finished part and a rerun with the same inputs does no work.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.corpus import Corpus
from tasks.core.parts import LOCAL, PartRunner, built_once, resumed_progress
from tasks.core.store import part_name, write_parquet_atomic

log = logging.getLogger(__name__)

QUERIES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("positive", pa.string()),  # null: the document itself is the positive
    ]
)

OFFLINE = "offline"


class QGenConfig(BaseModel):
    """Query generation settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    generator: str = Field(
        OFFLINE,
        description="'offline' (no model), or a doc2query seq2seq model: directory, bundled name or hub id",
    )
    queries_per_doc: int = Field(3, ge=1, le=50, description="queries generated per document")
    # seq2seq sampling (GPL's settings)
    top_p: float = Field(0.95, gt=0, le=1, description="seq2seq: nucleus sampling mass")
    top_k: int = Field(25, ge=1, description="seq2seq: sample among this many most likely tokens")
    max_new_tokens: int = Field(64, ge=4, le=512, description="seq2seq: longest query in tokens")
    max_input_tokens: int | None = Field(
        None, ge=16, description="seq2seq: document tokens kept (none: the model's limit)"
    )
    batch_size: int = Field(16, ge=1, description="seq2seq: documents per generation batch")
    # offline generator
    sentences_per_doc: int = Field(
        1,
        ge=0,
        le=50,
        description="offline: inverse-cloze sentences taken per document (each positive is a new passage to encode, so this sets the cost)",
    )
    word_window: int = Field(
        12,
        ge=0,
        le=200,
        description="offline: a text with no sentence ends (lower case, no punctuation) is cut into "
        "spans of this many words for inverse-cloze queries (0: such texts get none)",
    )
    keep_sentence_probability: float = Field(
        0.0, ge=0, le=1, description="offline: chance an inverse-cloze sentence stays in its positive passage"
    )
    min_words: int = Field(
        6, ge=1, description="offline: shortest sentence or title used as a query, in words"
    )
    max_words: int = Field(
        50, ge=2, description="offline: longest sentence or title used as a query, in words"
    )
    keyphrase_queries: int = Field(1, ge=0, le=10, description="offline: key-phrase queries per document")
    consistency_top_k: int | None = Field(
        None,
        ge=1,
        description="keep a query only if its source document ranks in the teacher's top k for it "
        "(none: keep all; the filter encodes every inverse-cloze passage, about as long as encoding "
        "the corpus again)",
    )
    part_size: int = Field(256, ge=1, description="documents per stored part (the unit of crash recovery)")
    seed: int = Field(13, description="random seed")


# ------------------------------------------------------------------------------------ offline

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")
_WORD = re.compile(r"(?u)\b\w[\w\-]*\w\b|\b\w\b")


def split_sentences(text: str) -> list[str]:
    """Sentences of a passage (a period, ! or ? followed by a capital, digit or bracket)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def word_spans(text: str, size: int) -> list[str]:
    """Consecutive spans of ``size`` words (a short last span joins the one before it): the
    "sentences" of a text that has no sentence ends."""
    words = text.split()
    spans = [words[i : i + size] for i in range(0, len(words), size)]
    if len(spans) > 1 and len(spans[-1]) < size // 2:
        spans[-2].extend(spans.pop())
    return [" ".join(span) for span in spans]


@dataclass(frozen=True)
class DraftQuery:
    text: str
    source: str
    positive: str | None  # None: the whole document


class OfflineGenerator:
    """Queries derived from the document itself, for when no generator model is available.

    Follows three published recipes for pseudo-queries without a model:

    * **title as query** — a document's title paired with its body, the "body first selection" /
      title-body pre-training pairs of Chang et al. 2020 ("Pre-training Tasks for Embedding-based
      Large-scale Retrieval");
    * **inverse cloze task** (Lee, Chang & Toutanova 2019, "Latent Retrieval for Weakly Supervised
      Open Domain Question Answering"): a sentence is the query and is removed from the passage
      that serves as its positive (kept with probability ``keep_sentence_probability``, 0 by default);
    * **key phrases** — the document's most salient terms by TF-IDF weight (Salton & Buckley 1988)
      joined into a keyword query, the style of short lexical queries users type.

    Each query is then kept only if it passes a round-trip consistency filter (Alberti et al. 2019;
    Promptagator, Dai et al. 2022): its source document must rank in the teacher's top k for it.
    The filter runs in :func:`consistency_filter`, outside this class, because it needs the teacher.
    """

    name = OFFLINE

    def __init__(self, config: QGenConfig, corpus: Corpus):
        self.config = config
        self.document_frequency = Counter()
        for text in corpus.texts():
            self.document_frequency.update(set(_terms(text)))
        self.n_docs = len(corpus)

    def generate(self, doc_id: str, title: str, text: str) -> list[DraftQuery]:
        config = self.config
        rng = random.Random(_seed(config.seed, doc_id))
        drafts: list[DraftQuery] = []
        if title and config.min_words <= len(title.split()) <= config.max_words:
            drafts.append(DraftQuery(title, "title", text))
        sentences = split_sentences(text)
        if len(sentences) < 2 and config.word_window:
            sentences = word_spans(text, config.word_window)
        usable = [
            i for i, s in enumerate(sentences) if config.min_words <= len(s.split()) <= config.max_words
        ]
        if len(sentences) > 1:
            for i in rng.sample(usable, min(config.sentences_per_doc, len(usable))):
                keep = rng.random() < config.keep_sentence_probability
                rest = " ".join(s for j, s in enumerate(sentences) if keep or j != i)
                positive = f"{title} {rest}".strip() if title else rest
                drafts.append(DraftQuery(sentences[i], "ict", None if keep else positive))
        for phrase in self.keyphrases(f"{title} {text}", config.keyphrase_queries, rng):
            drafts.append(DraftQuery(phrase, "keyphrase", None))
        return _dedupe(drafts)

    def keyphrases(self, text: str, count: int, rng: random.Random, terms_per_query: int = 4) -> list[str]:
        """Keyword queries from the highest TF-IDF terms (each query a different draw among the top)."""
        if count == 0:
            return []
        words = _terms(text)
        if not words:
            return []
        frequency = Counter(words)
        weight = {
            w: tf * math.log((1 + self.n_docs) / (1 + self.document_frequency[w]))
            for w, tf in frequency.items()
            if len(w) > 2 and not w.isdigit() and w not in _STOP
        }
        ranked = sorted(weight, key=lambda w: (-weight[w], w))[: terms_per_query * 3]
        if len(ranked) < 2:
            return []
        first_seen = {w: i for i, w in reversed(list(enumerate(words)))}
        queries = []
        for n in range(count):
            chosen = (
                ranked[:terms_per_query] if n == 0 else rng.sample(ranked, min(terms_per_query, len(ranked)))
            )
            queries.append(" ".join(sorted(chosen, key=first_seen.get)))
        return queries


def _terms(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


_STOP = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves however may might must shall via among within without
whether both either neither using used use based study studies results result show shows shown found""".split()
)


def _dedupe(drafts: Sequence[DraftQuery]) -> list[DraftQuery]:
    seen: set[str] = set()
    unique = []
    for draft in drafts:
        key = " ".join(draft.text.lower().split())
        if key and key not in seen:
            seen.add(key)
            unique.append(draft)
    return unique


def _seed(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


# ------------------------------------------------------------------------------------ seq2seq


class Seq2SeqGenerator:
    """A doc2query seq2seq model (T5 family) that samples queries for each document."""

    def __init__(self, config: QGenConfig, device: str = "cpu"):
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        from tasks.core.models import load_pretrained, load_processor, resolve_model

        self.config = config
        self.resolved = resolve_model(config.generator)
        self.name = config.generator
        self.tokenizer = load_processor(self.resolved, AutoTokenizer)
        self.model = load_pretrained(self.resolved, AutoModelForSeq2SeqLM).to(device).eval()
        limit = getattr(self.tokenizer, "model_max_length", 512)
        limit = limit if isinstance(limit, int) and 0 < limit < 100_000 else 512
        self.max_input = min(config.max_input_tokens or limit, limit)

    def generate_batch(self, texts: Sequence[str], seed: int) -> list[list[str]]:
        """queries_per_doc sampled queries per text, duplicates removed, in the order of ``texts``."""
        import torch

        config = self.config
        torch.manual_seed(seed)
        # longest first, so each batch pads to similar lengths
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        results: list[list[str]] = [[] for _ in texts]
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            inputs = self.tokenizer(
                [texts[i] for i in batch],
                truncation=True,
                max_length=self.max_input,
                padding=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                outputs = self.model.generate(
                    input_ids=inputs["input_ids"],  # only these: some tokenizers add token_type_ids
                    attention_mask=inputs["attention_mask"],
                    do_sample=True,
                    top_p=config.top_p,
                    top_k=config.top_k,
                    max_new_tokens=config.max_new_tokens,
                    num_return_sequences=config.queries_per_doc,
                )
            decoded = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
            for offset, i in enumerate(batch):
                chunk = decoded[offset * config.queries_per_doc : (offset + 1) * config.queries_per_doc]
                results[i] = [
                    d.text for d in _dedupe([DraftQuery(q.strip(), "seq2seq", None) for q in chunk])
                ]
        return results


# ---------------------------------------------------------------------------------- filtering

Ranker = Callable[[Sequence[str], Sequence[str | None], Sequence[int]], np.ndarray]


def consistency_filter(
    drafts: list[tuple[int, DraftQuery]],
    rank_of_source: Ranker,
    top_k: int | None,
) -> list[tuple[int, DraftQuery]]:
    """Keep (doc position, draft) pairs whose source document ranks within the teacher's top k."""
    if top_k is None or not drafts:
        return drafts
    ranks = rank_of_source(
        [d.text for _, d in drafts], [d.positive for _, d in drafts], [i for i, _ in drafts]
    )
    return [item for item, rank in zip(drafts, ranks, strict=True) if rank < top_k]


# ------------------------------------------------------------------------------------ the stage


def generate_queries(
    corpus: Corpus,
    config: QGenConfig,
    store: Any,
    *,
    key: str,
    rank_of_source: Ranker | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    parts: PartRunner = LOCAL,
) -> Any:
    """Generate, filter and store queries for every document; returns the stage's StageRef.

    ``rank_of_source(texts, positives, doc_positions)`` gives each query's rank of its source
    document under the teacher (0 = first); it is required when ``consistency_top_k`` is set. Each
    unfinished part is a job for ``parts``; with the consistency filter too when ``rank_of_source``
    is portable (a :class:`tasks.text.teachers.SourceRanker` of a teacher spec), else they run here.
    """
    from tasks.core.store import chunked

    if store.is_complete("queries", key):
        return store.ref("queries", key)
    if config.consistency_top_k is not None and rank_of_source is None:
        raise ValueError("consistency_top_k is set but no teacher ranking (rank_of_source) was given")
    writer = store.open("queries", key, config=config.model_dump(mode="json"), inputs=[corpus.key])
    docs = corpus.docs
    chunks = list(chunked(range(len(docs)), config.part_size))
    todo = [(index, positions) for index, positions in chunks if not writer.has_part(index)]
    # the consistency filter's ranker goes to workers when it is portable (a SourceRanker whose
    # teacher a worker builds from the workspace), one part's documents with each part
    remote = parts.distributed and (rank_of_source is None or getattr(rank_of_source, "portable", False))
    if parts.distributed and not remote:
        log.info("queries: the consistency filter's teacher stays here; generating in the flow's process")
    generator: Any = None
    if todo:  # built only when there is work: a finished stage loads no model
        if config.generator == OFFLINE:
            generator = OfflineGenerator(config, corpus)  # document frequencies: shipped with each part
        elif remote:
            generator = Seq2SeqSpec(config, device)  # a worker loads the model once
        else:
            generator = Seq2SeqGenerator(config, device=device)
    jobs = [
        QueryPart(
            generator,
            config,
            str(writer.path),
            index,
            [docs["doc_id"].iat[p] for p in positions],
            [docs["title"].iat[p] for p in positions],
            [docs["text"].iat[p] for p in positions],
            [int(p) for p in positions],
            rank_of_source.for_part([int(p) for p in positions])
            if remote and rank_of_source is not None
            else rank_of_source,
        )
        for index, positions in todo
    ]
    progress = resumed_progress(progress, len(chunks) - len(jobs), len(chunks))
    (parts if remote else LOCAL).run("generate queries", jobs, progress)
    kept = total = 0
    for index, _ in chunks:  # every part's counts, whoever wrote it and when
        meta = pq.read_schema(writer.path / part_name(index)).metadata or {}
        rows = pq.read_metadata(writer.path / part_name(index)).num_rows
        total += int(meta.get(b"generated", rows))
        kept += rows
    return writer.commit(empty_schema=QUERIES_SCHEMA, generated=total, kept=kept, generator=config.generator)


@dataclass(frozen=True)
class Seq2SeqSpec:
    """A seq2seq generator as a worker builds it (once per process): its settings, not its weights."""

    config: QGenConfig
    device: str = "cpu"

    def build(self) -> Seq2SeqGenerator:
        key = ("seq2seq", self.config.model_dump_json(), self.device)
        return built_once(key, lambda: Seq2SeqGenerator(self.config, device=self.device))


@dataclass(frozen=True)
class QueryPart:
    """One part of the queries stage: generate (and filter) the queries of its documents and write the
    part, which records how many were generated before the filter. Does nothing when the part exists."""

    generator: Any  # OfflineGenerator, Seq2SeqGenerator or Seq2SeqSpec
    config: QGenConfig
    stage_dir: str
    index: int
    doc_ids: list[str]
    titles: list[str]
    texts: list[str]
    positions: list[int]  # the documents' rows in the corpus (the teacher's ranker takes them)
    rank_of_source: Ranker | None = None

    def __call__(self) -> None:
        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return
        generator = self.generator.build() if isinstance(self.generator, Seq2SeqSpec) else self.generator
        drafts: list[tuple[int, DraftQuery]] = []
        if isinstance(generator, OfflineGenerator):
            for row, (doc_id, title, text) in enumerate(
                zip(self.doc_ids, self.titles, self.texts, strict=True)
            ):
                drafts.extend((row, d) for d in generator.generate(doc_id, title, text))
        else:
            passages = [f"{t} {x}".strip() if t else x for t, x in zip(self.titles, self.texts, strict=True)]
            batches = generator.generate_batch(passages, seed=self.config.seed + self.index)
            for row, queries in enumerate(batches):
                drafts.extend((row, DraftQuery(q, "seq2seq", None)) for q in queries)
        kept = drafts
        if self.rank_of_source is not None:
            # the ranker takes corpus rows: map this part's rows to them and back
            in_corpus = [(self.positions[row], d) for row, d in drafts]
            kept_rows = consistency_filter(in_corpus, self.rank_of_source, self.config.consistency_top_k)
            row_of = {p: row for row, p in enumerate(self.positions)}
            kept = [(row_of[p], d) for p, d in kept_rows]
        table = _queries_table(self.doc_ids, kept, generator.name)
        write_parquet_atomic(target, table.replace_schema_metadata({"generated": str(len(drafts))}))


def _queries_table(doc_ids: Sequence[str], items: list[tuple[int, DraftQuery]], generator: str) -> pa.Table:
    rows: dict[str, list[Any]] = {name: [] for name in QUERIES_SCHEMA.names}
    counters: Counter[str] = Counter()
    for row, draft in items:
        doc_id = doc_ids[row]
        counters[doc_id] += 1
        rows["query_id"].append(f"{doc_id}-q{counters[doc_id]}")
        rows["doc_id"].append(doc_id)
        rows["text"].append(draft.text)
        rows["source"].append(draft.source if generator == OFFLINE else generator)
        rows["positive"].append(draft.positive)
    return pa.Table.from_pydict(rows, schema=QUERIES_SCHEMA)
