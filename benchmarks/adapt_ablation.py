"""Ablations of the listwise query-side training on a development split (SciFact: its train claims).

Trains the query side of all-MiniLM-L6-v2 on the corpus's offline-generated queries with the
offline teacher's candidate lists, one run per settings given on the command line, and scores each
run on the development judgments: dense nDCG@10 and Recall@100, and the hybrid (dense + BM25) at
BM25 weights 0.2-0.5, each with the trained weights as they are and averaged with the start
model's (WiSE-FT). Never pass SciFact's test split: the defaults are chosen on these numbers.

Each run is one JSON object: ``{"teacher_bm25_weight": 0.3, "top": 32, "sampled": 0,
"types": ["title", "ict"], "include_source": true, "pool": "hybrid", "wise": [0.0, 0.5], ...ListwiseConfig
fields...}``; ``pool`` is where each list's documents come from: the teacher's own top (``hybrid``,
the flow's) or the start model's dense top (``dense``, GPL's mining), scored by the teacher either
way. ``--qgen`` takes
QGenConfig fields for the offline generator. Corpus embeddings, teacher query embeddings and the
candidate lists are cached in ``--workspace``, so a further run costs its training time only.
Appends one row per (run, averaging) to benchmarks/results/adapt_ablation.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
HYBRID_WEIGHTS = (0.2, 0.3, 0.4, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="one JSON object of settings per run")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "scifact")
    parser.add_argument("--split", default="train", help="development judgments (never SciFact's test)")
    parser.add_argument("--qgen", default="{}", help="QGenConfig fields for the offline generator (JSON)")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/adapt-ablation"))
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "adapt_ablation.jsonl"
    )
    args = parser.parse_args()

    import numpy as np

    from finetune.listwise import CandidateLists, ListwiseConfig, train_listwise
    from tasks.core.bm25 import BM25Index
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.defaults import BASE_MODEL
    from tasks.core.embeddings import EmbeddingCache, encode_texts
    from tasks.core.evaluation import aggregate, identical_ids, score_run
    from tasks.core.hybrid import hybrid_rows, run_from_rows
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.text.lists import choose_candidates
    from tasks.text.queries import OfflineGenerator, QGenConfig
    from tasks.text.teachers import OfflineTeacher

    if args.data.name == "scifact" and args.split == "test":
        parser.error("SciFact's test claims judge the defaults; tune on --split train")
    workspace = args.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    corpus = read_corpus(args.data)
    dev = read_judged_queries(args.data, args.split, corpus)
    base = resolve_model(BASE_MODEL)
    encoder = load_sentence_transformer(base)
    cache = EmbeddingCache(workspace, encoder, base.fingerprint, max_seq_length=256)
    documents = cache.embed(corpus.texts(), desc="corpus")
    bm25 = BM25Index(corpus.texts())
    qgen = QGenConfig(**json.loads(args.qgen))
    generator = OfflineGenerator(qgen, corpus)
    queries, sources, origins = [], [], []
    for position, row in enumerate(corpus.docs.itertuples(index=False)):
        for draft in generator.generate(row.doc_id, row.title, row.text):
            queries.append(draft.text)
            sources.append(draft.source)
            origins.append(position)
    qgen_tag = hashlib.sha1(qgen.model_dump_json().encode()).hexdigest()[:8]
    dev_texts, dev_ids = dev.queries["text"].tolist(), dev.queries["query_id"].tolist()
    dev_bm25 = bm25.score_rows(dev_texts)
    exclude = identical_ids(dev)

    def evaluate(query_vectors):
        dense = query_vectors @ documents.T
        out = {}
        systems = [("dense", dense)] + [
            (f"hybrid {w}", hybrid_rows(dense, dev_bm25, w)) for w in HYBRID_WEIGHTS
        ]
        for name, rows in systems:
            run = run_from_rows(rows, corpus.ids, dev_ids, exclude=exclude)
            metrics = aggregate(score_run(dev.qrels, run, {"nDCG@10": "nDCG@10", "Recall@100": "R@100"}))
            out[name] = {k: round(v, 4) for k, v in metrics.items()}
        return out

    before = evaluate(cache.embed(dev_texts))
    print("before", json.dumps(before), flush=True)
    for text in args.runs:
        run = json.loads(text)
        weight, top, sampled = run.pop("teacher_bm25_weight", 0.3), run.pop("top", 32), run.pop("sampled", 0)
        types, wise = run.pop("types", None), run.pop("wise", [0.0])
        include_source = run.pop("include_source", True)
        pool = run.pop("pool", "hybrid")
        if pool not in ("hybrid", "dense"):
            parser.error(f"pool must be hybrid or dense, not {pool!r}")
        config = ListwiseConfig(**{"average_with_start": 0.0, **run})
        lists_file = workspace / (
            f"lists-{qgen_tag}-{weight}-{top}-{sampled}"
            + ("" if include_source else "-nosource")
            + ("" if pool == "hybrid" else f"-{pool}")
            + ".npz"
        )
        if lists_file.exists():
            saved = np.load(lists_file)
            candidates, scores = saved["c"], saved["s"]
        else:
            teacher = OfflineTeacher(bm25, cache, documents, bm25_weight=weight)
            rng, parts = np.random.default_rng(13), []
            for start in range(0, len(queries), 1024):
                rows = np.array(teacher.rank_rows(queries[start : start + 1024]), dtype=np.float32)
                if not include_source:  # as ListConfig.include_source=False: the source never in its list
                    rows[np.arange(len(rows)), origins[start : start + 1024]] = -np.inf
                if pool == "hybrid":
                    parts.append(choose_candidates(rows, top, sampled, rng))
                    continue
                # dense mining: the start model's top documents (the same exclusions), teacher-scored
                dense_rows = cache.embed(queries[start : start + 1024]) @ documents.T
                dense_rows[~np.isfinite(rows)] = -np.inf
                positions, _ = choose_candidates(dense_rows, top, sampled, rng)
                parts.append((positions, np.take_along_axis(rows, positions, axis=1)))
            candidates, scores = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            np.savez(lists_file, c=candidates, s=scores)
        keep = [i for i, s in enumerate(sources) if types is None or s in types]
        lists = CandidateLists([queries[i] for i in keep], candidates[keep], scores[keep])
        settings = {
            "teacher_bm25_weight": weight,
            "top": top,
            "sampled": sampled,
            "types": types,
            **({} if include_source else {"include_source": False}),
            **({} if pool == "hybrid" else {"pool": pool}),
            "qgen": qgen.model_dump(),
            "listwise": config.model_dump(),
        }
        tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        began = time.time()
        result = train_listwise(str(base.path), lists, documents, config, workspace / "runs" / tag)
        trained = load_sentence_transformer(str(result.model_dir))
        trained.max_seq_length = 256
        weights, start = {k: v.clone() for k, v in trained.state_dict().items()}, encoder.state_dict()
        for mix in wise:
            trained.load_state_dict(
                {
                    k: mix * start[k] + (1 - mix) * v if v.is_floating_point() else v
                    for k, v in weights.items()
                }
            )
            after = evaluate(encode_texts(trained, dev_texts, batch_size=64, show_progress=False))
            row = {
                "tag": tag,
                **settings,
                "average_with_start": mix,
                "training_queries": len(lists),
                "steps": result.steps,
                "train_seconds": result.seconds,
                "wall_seconds": round(time.time() - began, 1),
                "dev": f"{args.data.name} [{args.split}], {len(dev_ids)} queries",
                "before": before,
                "after": after,
            }
            print(tag, f"average {mix}", json.dumps(after), flush=True)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            with args.output.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
