"""Image/text (catalog) evaluation on products held out of training.

A catalog has no queries or judgments; they are built from its own fields: each product's caption
must find its image (caption -> image), attribute queries built from field combinations
("{gender} {baseColour} {articleType}") must find every product with those values
(attribute -> image), and each image must find other images of its kind (image -> image, by
articleType). Runs are exact FAISS searches, scored by ir-measures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.evaluation import EvalReport, aggregate, score_run
from tasks.core.index import Qrels, Run, exact_index, search_index
from tasks.core.markdown import md

log = logging.getLogger(__name__)


CAPTION_MEASURES: dict[str, str] = {
    "Recall@1": "R@1",
    "Recall@5": "R@5",
    "Recall@10": "R@10",
    "MRR": "RR@100",
}


ATTRIBUTE_MEASURES: dict[str, str] = {"nDCG@10": "nDCG@10", "P@10": "P@10", "Recall@100": "R@100"}


IMAGE_MEASURES: dict[str, str] = {"P@10": "P@10", "nDCG@10": "nDCG@10"}


DEFAULT_ATTRIBUTE_QUERIES = ("{gender} {baseColour} {articleType}",)


CATALOG_PRIMARY_METRIC = "attribute_ndcg@10"


@dataclass
class CatalogEvalSet:
    """Held-out products (the gallery) with queries and judgments built from their fields."""

    doc_ids: list[str]
    pixels: np.ndarray  # uint8 (N, height, width, 3), row i is doc_ids[i]
    captions: list[str]
    caption_qrels: dict[str, dict[str, int]]  # query id = product id: its caption finds its image
    attribute_queries: dict[str, str]
    attribute_qrels: dict[str, dict[str, int]]
    image_qrels: dict[str, dict[str, int]]  # query id = product id: other products of its group
    group_field: str
    source: str = ""


def catalog_eval_set(
    pairs: Any,
    *,
    attribute_templates: Sequence[str] = DEFAULT_ATTRIBUTE_QUERIES,
    group_field: str = "articleType",
) -> CatalogEvalSet:
    """Queries and judgments from held-out pairs (a :class:`tasks.catalog.pairs.Pairs`).

    Attribute queries: every distinct filling of each template by a product whose fields it uses
    are all non-empty; every product with the same values is relevant. Image queries: each product
    whose group (articleType) has another product; the others of its group are relevant.
    """
    from tasks.catalog.pairs import render_caption, template_fields

    ids = [str(i) for i in pairs.ids]
    attributes = pairs.attributes()
    if attributes and group_field not in attributes[0]:
        raise ValueError(
            f"group field '{group_field}' is not a catalog field; fields: {sorted(attributes[0])}"
        )
    attribute_queries: dict[str, str] = {}
    attribute_qrels: dict[str, dict[str, int]] = {}
    by_text: dict[str, str] = {}
    for template in attribute_templates:
        fields = template_fields(template)
        missing = [f for f in fields if attributes and f not in attributes[0]]
        if missing:
            raise ValueError(
                f"attribute query {template!r} names field(s) {missing} that are not catalog fields; "
                f"fields: {sorted(attributes[0])}"
            )
        groups: dict[tuple[str, ...], list[str]] = {}
        for doc_id, values in zip(ids, attributes, strict=True):
            combo = tuple((values.get(f) or "").strip() for f in fields)
            if all(combo):
                groups.setdefault(combo, []).append(doc_id)
        for combo, members in sorted(groups.items()):
            text = render_caption(template, dict(zip(fields, combo, strict=True)))
            query_id = by_text.get(text.lower())
            if query_id is None:
                query_id = f"attr-{len(attribute_queries) + 1:05d}"
                by_text[text.lower()] = query_id
                attribute_queries[query_id] = text
            attribute_qrels.setdefault(query_id, {}).update(dict.fromkeys(members, 1))
    members_of: dict[str, list[str]] = {}
    for doc_id, values in zip(ids, attributes, strict=True):
        group = (values.get(group_field) or "").strip()
        if group:
            members_of.setdefault(group, []).append(doc_id)
    image_qrels = {}
    for doc_id, values in zip(ids, attributes, strict=True):
        others = [d for d in members_of.get((values.get(group_field) or "").strip(), []) if d != doc_id]
        if others:
            image_qrels[doc_id] = dict.fromkeys(others, 1)
    return CatalogEvalSet(
        doc_ids=ids,
        pixels=pairs.pixels,
        captions=list(pairs.captions),
        caption_qrels={d: {d: 1} for d in ids},
        attribute_queries=attribute_queries,
        attribute_qrels=attribute_qrels,
        image_qrels=image_qrels,
        group_field=group_field,
        source=str(getattr(pairs, "source", "")),
    )


@dataclass
class CatalogReport:
    """Caption -> image, attribute -> image and image -> image results of one encoder."""

    system: str
    n_products: int
    caption: EvalReport
    attribute: EvalReport
    image: EvalReport
    seconds: float = 0.0
    notes: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        """Flat metric names: caption_recall@10, attribute_ndcg@10, image_precision@10, ..."""
        flat = {}
        for task_name, report in (
            ("caption", self.caption),
            ("attribute", self.attribute),
            ("image", self.image),
        ):
            for name, value in report.metrics.items():
                flat[f"{task_name}_{_flat_metric_name(name)}"] = value
        return flat

    @property
    def primary(self) -> float:
        return self.metrics[CATALOG_PRIMARY_METRIC]

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "n_products": self.n_products,
            "metrics": self.metrics,
            "seconds": self.seconds,
            "notes": self.notes,
            "caption": self.caption.to_dict(),
            "attribute": self.attribute.to_dict(),
            "image": self.image.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogReport:
        return cls(
            system=data["system"],
            n_products=data["n_products"],
            caption=EvalReport.from_dict(data["caption"]),
            attribute=EvalReport.from_dict(data["attribute"]),
            image=EvalReport.from_dict(data["image"]),
            seconds=data.get("seconds", 0.0),
            notes=data.get("notes", ""),
        )

    def save(self, path: str | Path) -> Path:
        from tasks.core.store import write_json_atomic

        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path


def _flat_metric_name(name: str) -> str:
    return {"Recall": "recall", "MRR": "mrr", "nDCG": "ndcg", "P": "precision"}.get(
        name.split("@")[0], name.lower()
    ) + (f"@{name.split('@')[1]}" if "@" in name else "")


def _scored(
    system: str,
    dataset: str,
    qrels: Qrels,
    run: Run,
    measures: Mapping[str, str],
    n_docs: int,
    seconds: float,
) -> EvalReport:
    per_query = score_run(qrels, run, measures)
    return EvalReport(
        system=system,
        dataset=dataset,
        n_queries=len(qrels),
        n_docs=n_docs,
        metrics=aggregate(per_query),
        per_query=per_query,
        top_hits={q: sorted(h, key=h.get, reverse=True)[:10] for q, h in run.items()},
        seconds=round(seconds, 2),
    )


def evaluate_catalog_encoder(
    encoder: Any,
    eval_set: CatalogEvalSet,
    *,
    system: str,
    top_k: int = 100,
    workspace: str | Path | None = None,
    batch_size: int = 128,
    show_progress: bool = True,
    image_embeddings: np.ndarray | None = None,
) -> CatalogReport:
    """Caption -> image (Recall@1/5/10, MRR), attribute -> image (nDCG@10, P@10, Recall@100) and
    image -> image by group (P@10) of an image/text encoder (``encode_text`` / ``encode_images``) on
    held-out products. Text vectors are cached in ``workspace`` (keyed by the text model's
    fingerprint), so a frozen text tower's queries are encoded once for before and after."""
    from tasks.catalog.encoders import cached_text_embeddings

    start = time.time()
    dataset = f"{eval_set.source} [held out: {len(eval_set.doc_ids)} products]"
    if image_embeddings is None:
        image_embeddings = encoder.encode_images(eval_set.pixels, show_progress=show_progress)
    index = exact_index(image_embeddings)
    ids = eval_set.doc_ids

    began = time.time()
    caption_vectors = cached_text_embeddings(
        encoder, eval_set.captions, workspace, batch_size=batch_size, show_progress=show_progress
    )
    run = search_index(index, ids, ids, caption_vectors, top_k=top_k)
    caption = _scored(
        system, dataset, eval_set.caption_qrels, run, CAPTION_MEASURES, len(ids), time.time() - began
    )

    began = time.time()
    query_ids = list(eval_set.attribute_queries)
    query_vectors = cached_text_embeddings(
        encoder,
        [eval_set.attribute_queries[q] for q in query_ids],
        workspace,
        batch_size=batch_size,
        show_progress=show_progress,
    )
    run = search_index(index, ids, query_ids, query_vectors, top_k=top_k)
    attribute = _scored(
        system, dataset, eval_set.attribute_qrels, run, ATTRIBUTE_MEASURES, len(ids), time.time() - began
    )

    began = time.time()
    image_queries = [d for d in ids if d in eval_set.image_qrels]
    position = {d: i for i, d in enumerate(ids)}
    rows = [position[d] for d in image_queries]
    run = search_index(
        index,
        ids,
        image_queries,
        image_embeddings[rows],
        top_k=top_k,
        exclude={d: {d} for d in image_queries},
    )
    image = _scored(system, dataset, eval_set.image_qrels, run, IMAGE_MEASURES, len(ids), time.time() - began)
    return CatalogReport(
        system=system,
        n_products=len(ids),
        caption=caption,
        attribute=attribute,
        image=image,
        seconds=round(time.time() - start, 2),
    )


def catalog_metrics_markdown(reports: Sequence[CatalogReport]) -> str:
    """Metric rows, one column per system, with the change from the first system to the last."""
    names = list(reports[0].metrics)
    header = (
        "| metric | "
        + " | ".join(md(r.system) for r in reports)
        + (" | change |" if len(reports) > 1 else " |")
    )
    lines = [header, "|---|" + "---:|" * (len(reports) + (1 if len(reports) > 1 else 0))]
    for name in names:
        values = [r.metrics[name] for r in reports]
        change = f" {values[-1] - values[0]:+.4f} |" if len(reports) > 1 else ""
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + " |" + change)
    return "\n".join(lines)
