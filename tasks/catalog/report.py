"""The picture report of an image/text adaptation: for a few queries, the top images before and after.

A PNG grid (matplotlib): one row per query, its top-k images before training on the left and after
on the right, each framed green when it is relevant (it has the queried attributes), red when it
is not, and unframed for free-text queries with no judgments. Plus the markdown of the whole
report (metrics before/after, the grid, timings, left-out products), and the evaluation of a
saved encoder on the held-out products that feeds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.catalog.evaluation import CatalogEvalSet, CatalogReport, catalog_metrics_markdown
from tasks.core.index import exact_index, search_index
from tasks.core.markdown import md, md_code
from tasks.core.store import write_text_atomic


@dataclass
class GridRow:
    """One query of the grid: its text and the (image, relevant?) hits before and after."""

    query: str
    before: list[tuple[np.ndarray, bool | None]]
    after: list[tuple[np.ndarray, bool | None]]


def pick_showcase_queries(
    eval_set: CatalogEvalSet, before: CatalogReport, after: CatalogReport, n: int = 4, metric: str = "nDCG@10"
) -> list[str]:
    """Attribute queries to show: those that changed most, at most one per value of the last field
    (e.g. one per articleType), preferring queries with several relevant products."""
    b, a = before.attribute.per_query[metric], after.attribute.per_query[metric]
    ranked = sorted(
        eval_set.attribute_queries,
        key=lambda q: (-(a.get(q, 0.0) - b.get(q, 0.0)), -len(eval_set.attribute_qrels.get(q, {})), q),
    )
    chosen: list[str] = []
    seen_tails: set[str] = set()
    for query_id in ranked:
        if len(eval_set.attribute_qrels.get(query_id, {})) < 2:
            continue
        tail = eval_set.attribute_queries[query_id].split()[-1].lower()
        if tail in seen_tails:
            continue
        seen_tails.add(tail)
        chosen.append(query_id)
        if len(chosen) == n:
            break
    return chosen


def search_texts(
    query_vectors: np.ndarray, image_vectors: np.ndarray, doc_ids: Sequence[str], k: int
) -> list[list[str]]:
    """Top-k product ids per query vector (exact cosine)."""
    run = search_index(
        exact_index(image_vectors),
        list(doc_ids),
        [str(i) for i in range(len(query_vectors))],
        query_vectors,
        top_k=k,
    )
    return [sorted(run[str(i)], key=run[str(i)].get, reverse=True) for i in range(len(query_vectors))]


def grid_rows(
    eval_set: CatalogEvalSet,
    queries: Mapping[str, str],
    before_hits: Mapping[str, Sequence[str]],
    after_hits: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]] | None = None,
    k: int = 5,
) -> list[GridRow]:
    """Rows for :func:`image_grid_png` from hit lists (product ids) of the eval set's gallery."""
    position = {d: i for i, d in enumerate(eval_set.doc_ids)}
    rows = []
    for query_id, text in queries.items():
        relevant = qrels.get(query_id) if qrels is not None else None

        def cells(hits: Sequence[str], relevant=relevant) -> list[tuple[np.ndarray, bool | None]]:
            return [
                (eval_set.pixels[position[d]], None if relevant is None else relevant.get(d, 0) > 0)
                for d in list(hits)[:k]
            ]

        rows.append(GridRow(text, cells(before_hits.get(query_id, [])), cells(after_hits.get(query_id, []))))
    return rows


def image_grid_png(
    rows: Sequence[GridRow],
    path: str | Path,
    *,
    title: str,
    before_label: str = "before",
    after_label: str = "after",
) -> Path:
    """The grid as a PNG: query | top-k before | top-k after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = max([len(r.before) for r in rows] + [len(r.after) for r in rows] + [1])
    columns = 2 * k + 2  # query text, k before, a gap, k after
    figure, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(0.95 * columns + 0.8, 1.45 * len(rows) + 0.6),
        dpi=110,
        squeeze=False,
        gridspec_kw={"width_ratios": [1.9] + [1] * k + [0.25] + [1] * k},
    )
    for r, row in enumerate(rows):
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r][0].text(
            0.0, 0.5, _wrap(row.query, 24), va="center", ha="left", fontsize=8, transform=axes[r][0].transAxes
        )
        for offset, hits in ((1, row.before), (k + 2, row.after)):
            for j, (pixels, relevant) in enumerate(hits):
                ax = axes[r][offset + j]
                ax.imshow(pixels, interpolation="nearest")
                if relevant is not None:
                    for spine in ax.spines.values():
                        spine.set_visible(True)
                        spine.set_edgecolor("#1a9850" if relevant else "#d73027")
                        spine.set_linewidth(2.5)
    axes[0][1 + (k - 1) // 2].set_title(before_label, fontsize=9)
    axes[0][k + 2 + (k - 1) // 2].set_title(after_label, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    staging = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}.png")
    try:  # whole or not at all: a full disk leaves no half a PNG
        figure.savefig(staging)
        os.replace(staging, path)
    finally:
        plt.close(figure)
        staging.unlink(missing_ok=True)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:4])


def catalog_report_markdown(
    *,
    title: str,
    reports: Sequence[CatalogReport],
    grid: str | Path | None,
    timings: str,
    notes: Sequence[str] = (),
    left_out: str = "",
) -> str:
    """The report a person reads: metrics per system, the picture grid, timings, notes, left-out products."""
    parts = [f"# {title}", "", catalog_metrics_markdown(reports), ""]
    parts += [f"* {note}" for note in notes]
    if grid:
        parts += [
            "",
            f"Top images before and after (green: has the queried attributes, red: does not): {md_code(grid)}",
            "",
            f"![top images before and after]({Path(grid).resolve().as_uri()})",
        ]
    parts += ["", "## Timings", "", timings]
    if left_out:
        parts += ["", "## Products left out", "", left_out]
    return "\n".join(parts) + "\n"


def report_summary(
    report: CatalogReport,
    keys: Sequence[str] = ("caption_recall@10", "attribute_ndcg@10", "image_precision@10"),
) -> dict[str, Any]:
    return {k: round(report.metrics[k], 4) for k in keys}


def evaluate_catalog_model(
    model: str | Path,
    pairs_path: str | Path,
    output: str | Path,
    *,
    system: str,
    heldout_fraction: float,
    split_salt: str = "holdout",
    attribute_templates: Sequence[str] = ("{gender} {baseColour} {articleType}",),
    group_field: str = "articleType",
    workspace: str | Path | None = None,
    tower: dict[str, Any] | None = None,
    seed: int = 0,
    showcase_queries: Sequence[str] = (),
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on the held-out products of a committed pairs stage; save the report as JSON.

    ``model`` is a saved catalog encoder or a CLIP model; or a text model together with ``tower``
    (the image tower's shape): then the untrained, seeded locked-text encoder that training starts
    from is evaluated (the "before"). Free-text ``showcase_queries`` get their top images recorded
    for the picture report. Returns the report's path and metrics.
    """
    from tasks.catalog.encoders import initial_encoder, load_catalog_encoder
    from tasks.catalog.evaluation import catalog_eval_set, evaluate_catalog_encoder
    from tasks.catalog.pairs import load_pairs, split_pairs
    from tasks.core.corpus import DataError
    from tasks.core.store import write_json_atomic

    pairs = load_pairs(pairs_path)
    _, held_out = split_pairs(pairs, heldout_fraction, salt=split_salt)
    if len(held_out) < 2:
        raise DataError(
            pairs.source,
            None,
            f"only {len(held_out)} of {len(pairs)} products are held out for "
            f"evaluation with a held-out fraction of {heldout_fraction}; raise it",
        )
    try:
        eval_set = catalog_eval_set(
            held_out, attribute_templates=attribute_templates, group_field=group_field
        )
    except ValueError as exc:
        raise DataError(pairs.source, None, str(exc)) from None
    encoder = initial_encoder(model, tower, seed=seed) if tower is not None else load_catalog_encoder(model)
    image_vectors = encoder.encode_images(eval_set.pixels, show_progress=show_progress)
    report = evaluate_catalog_encoder(
        encoder,
        eval_set,
        system=system,
        workspace=workspace,
        image_embeddings=image_vectors,
        show_progress=show_progress,
    )
    if tower is not None:
        report.notes = "untrained image tower (random, seeded initialisation): near random by construction"
    showcase = {}
    if showcase_queries:
        hits = search_texts(encoder.encode_text(list(showcase_queries)), image_vectors, eval_set.doc_ids, 10)
        showcase = dict(zip(showcase_queries, hits, strict=True))
    data = {**report.to_dict(), "model": str(model), "showcase_hits": showcase}
    write_json_atomic(Path(output), data)
    return {"report": str(output), "system": system, "metrics": report.metrics, "primary": report.primary}


def publish_catalog_report(
    pairs_path: str | Path,
    reports: Sequence[str | Path],
    output_dir: str | Path,
    *,
    heldout_fraction: float,
    split_salt: str = "holdout",
    attribute_templates: Sequence[str] = ("{gender} {baseColour} {articleType}",),
    group_field: str = "articleType",
    timings: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
    n_grid_queries: int = 4,
    title: str = "Catalog image/text adaptation",
    artifact_key: str = "catalog-clip-report",
) -> dict[str, str]:
    """The picture grid (first report = before, last = after) and the markdown report; published as
    a Prefect markdown artifact inside a run. Returns the paths of the PNG and the markdown file."""
    import json

    from tasks.catalog.evaluation import catalog_eval_set
    from tasks.catalog.pairs import bad_images_markdown, load_pairs, split_pairs
    from tasks.core.report import publish_markdown, timings_markdown

    loaded = [json.loads(Path(p).read_text()) for p in reports]
    catalog_reports = [CatalogReport.from_dict(d) for d in loaded]
    before, after = catalog_reports[0], catalog_reports[-1]
    pairs = load_pairs(pairs_path)
    _, held_out = split_pairs(pairs, heldout_fraction, salt=split_salt)
    eval_set = catalog_eval_set(held_out, attribute_templates=attribute_templates, group_field=group_field)
    picked = pick_showcase_queries(eval_set, before, after, n=n_grid_queries)
    queries = {q: eval_set.attribute_queries[q] for q in picked}
    before_hits = {q: before.attribute.top_hits.get(q, []) for q in picked}
    after_hits = {q: after.attribute.top_hits.get(q, []) for q in picked}
    for i, (text, hits) in enumerate(loaded[-1].get("showcase_hits", {}).items()):
        queries[f"free-{i}"] = text
        before_hits[f"free-{i}"] = loaded[0].get("showcase_hits", {}).get(text, [])
        after_hits[f"free-{i}"] = hits
    output_dir = Path(output_dir)
    grid = None
    if queries:
        rows = grid_rows(eval_set, queries, before_hits, after_hits, qrels=eval_set.attribute_qrels)
        grid = image_grid_png(
            rows,
            output_dir / "top-images.png",
            before_label=f"before: {before.system}",
            after_label=f"after: {after.system}",
            title=f"{Path(pairs.source).name}: top 5 of {len(eval_set.doc_ids)} held-out products",
        )
    report_notes = [
        f"{len(eval_set.doc_ids)} held-out products (never trained on): "
        f"{len(eval_set.caption_qrels)} caption queries, {len(eval_set.attribute_queries)} attribute "
        f"queries ({md('; '.join(attribute_templates))}), {len(eval_set.image_qrels)} image queries "
        f"(relevant: same {md(group_field)})."
    ]
    report_notes += [f"{md(r.system)}: {md(r.notes)}" for r in catalog_reports if r.notes]
    report_notes += list(notes)
    markdown = catalog_report_markdown(
        title=title,
        reports=catalog_reports,
        grid=grid,
        timings=timings_markdown(timings or {}),
        notes=report_notes,
        left_out=bad_images_markdown(pairs.bad),
    )
    path = output_dir / "report.md"
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, markdown)
    publish_markdown(
        markdown, key=artifact_key, description="image/text metrics before/after, top images, timings"
    )
    return {"markdown": str(path), "grid": str(grid) if grid else ""}
