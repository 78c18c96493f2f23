"""Corpus encoding + query generation on 1 and on 2 Dask workers of one core each (SciFact).

The two per-part stages of `adapt text` that fan out with ``task_runner: dask``, run as the flow
runs them (``flows.engine.part_runner``: one Prefect task per part on a ``LocalCluster`` of N worker
processes with one thread each, the workspace checked first), on the whole SciFact corpus with the
flow's defaults (the bundled MiniLM at 256 tokens, parts of 256 documents; the offline generator,
parts of 256 documents). Each run starts from an empty workspace, so nothing comes from a cache.

Also measured: the per-part overhead of the Dask path (the wall time of parts that do nothing,
per part and worker), the cluster's start, and from the 1-worker run the encoding throughput of one
core, for the cost model in benchmarks/README.md.

Writes benchmarks/results/scaleout.json; top-level keys ``seconds_1_worker``, ``seconds_2_workers``
(encode + query generation, cluster start excluded), ``speedup`` and ``per_part_overhead_seconds``.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TARGET_SPEEDUP = 1.6


class Nothing:
    """A part job that does no work: what is left of its wall time is the Dask path's overhead."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self) -> int:
        return 0


def measure(corpus_path: Path, workers: int, workspace: Path, overhead_parts: int) -> dict[str, Any]:
    from prefect import flow

    @flow(name=f"scaleout-{workers}-workers")
    def run() -> dict[str, Any]:
        from flows.adapt_text import AdaptTextConfig
        from flows.engine import part_runner
        from tasks.core.corpus import read_corpus
        from tasks.core.embeddings import CacheSpec, embed_corpus
        from tasks.core.models import resolve_model
        from tasks.core.parts import EngineSettings
        from tasks.core.store import Store, stage_key
        from tasks.text.queries import generate_queries

        defaults = AdaptTextConfig(corpus=corpus_path)
        corpus = read_corpus(corpus_path)
        model = resolve_model(defaults.base_model)
        length = defaults.mine.max_seq_length
        spec = CacheSpec(str(workspace), str(model.path), model.fingerprint, length, defaults.mine.batch_size)
        store = Store(workspace)
        began = time.perf_counter()
        settings = EngineSettings(task_runner="dask", dask_workers=workers)
        with part_runner(settings, workspace) as parts:
            started = time.perf_counter()
            cache = spec.build()  # the flow's own cache: here it only names the folder, never encodes
            ref = embed_corpus(corpus, cache, store, part_size=defaults.encode_part_size, parts=parts)
            encoded = time.perf_counter()
            key = stage_key("queries", defaults.qgen.model_dump(mode="json"), inputs=[corpus.key])
            queries = generate_queries(corpus, defaults.qgen, store, key=key, parts=parts)
            generated = time.perf_counter()
            parts.run("nothing", [Nothing(i) for i in range(overhead_parts)])
            idle = time.perf_counter() - generated
        return {
            "workers": workers,
            "documents": len(corpus),
            "cluster_start_seconds": round(started - began, 2),
            "encode_seconds": round(encoded - started, 2),
            "encode_parts": len(ref.manifest["parts"]),
            "documents_encoded": ref.manifest["encoded"],
            "qgen_seconds": round(generated - encoded, 2),
            "qgen_parts": len(queries.manifest["parts"]),
            "queries": queries.manifest["kept"],
            "seconds": round(generated - started, 2),
            "empty_parts": overhead_parts,
            "empty_parts_seconds": round(idle, 3),
            "per_part_overhead_seconds": round(idle * workers / overhead_parts, 4),
        }

    return run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DATA / "scifact")
    parser.add_argument("--overhead-parts", type=int, default=40, help="empty parts timed for the overhead")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaleout.json")
    args = parser.parse_args()

    runs = {}
    for workers in (1, 2):
        workspace = Path(tempfile.mkdtemp(prefix=f"scaleout-{workers}-"))
        try:
            runs[workers] = measure(args.corpus, workers, workspace, args.overhead_parts)
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
        print(json.dumps(runs[workers]), file=sys.stderr)
    one, two = runs[1], runs[2]
    speedup = one["seconds"] / two["seconds"]
    per_core = one["documents_encoded"] / one["encode_seconds"]
    result = {
        "corpus": str(args.corpus.name),
        "seconds_1_worker": one["seconds"],
        "seconds_2_workers": two["seconds"],
        "speedup": round(speedup, 3),
        "target_speedup": TARGET_SPEEDUP,
        "met": speedup >= TARGET_SPEEDUP,
        "per_part_overhead_seconds": two["per_part_overhead_seconds"],
        "encode_documents_per_second_per_core": round(per_core, 2),
        "runs": {f"{w}_workers": r for w, r in runs.items()},
        "machine": machine_info(),
        "ran_alone": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("workers", "1", "2"),
        ("cluster start s", f"{one['cluster_start_seconds']}", f"{two['cluster_start_seconds']}"),
        ("encode s", f"{one['encode_seconds']}", f"{two['encode_seconds']}"),
        ("query generation s", f"{one['qgen_seconds']}", f"{two['qgen_seconds']}"),
        ("encode + qgen s", f"{one['seconds']}", f"{two['seconds']}"),
        ("per-part overhead s", f"{one['per_part_overhead_seconds']}", f"{two['per_part_overhead_seconds']}"),
    ]
    for row in rows:
        print(f"{row[0]:<22}{row[1]:>12}{row[2]:>12}")
    print(
        f"speedup {speedup:.2f}x (target {TARGET_SPEEDUP}x: {'met' if result['met'] else 'missed'}); "
        f"one core encodes {per_core:.1f} documents/s"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
