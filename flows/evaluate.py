"""Flow: retrieval evaluation of one or more models (and BM25) on a BEIR folder."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.stages import evaluate_bm25_task, evaluate_model_task, read_beir_task
from tasks.core.defaults import BASE_MODEL, DEFAULT_WORKSPACE
from tasks.core.evaluation import EvalReport, identical_ids, markdown_table, save_reports
from tasks.core.markdown import md, md_code
from tasks.core.report import publish_markdown
from tasks.core.settings import require_beir_split


class EvaluateConfig(BaseModel):
    """Settings of `adapt evaluate` and of the `evaluate` flow."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: Path = Field(description="BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    split: str = Field("test", description="which qrels/<split>.tsv to evaluate on")
    models: list[str] = Field(
        default_factory=lambda: [BASE_MODEL],
        description="sentence-transformers models: local directories, bundled names or hub ids",
    )
    bm25: bool = Field(True, description="also evaluate a BM25 baseline (bm25s, k1=0.9, b=0.4)")
    top_k: int = Field(100, ge=10, le=10000, description="hits retrieved per query")
    batch_size: int = Field(64, ge=1, description="encoding batch size")
    max_seq_length: int = Field(256, ge=8, le=8192, description="tokens per passage kept by the encoder")
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for run outputs")
    output: Path | None = Field(
        None, description="JSON report path; none means <workspace>/reports/evaluate-<time>.json"
    )

    @model_validator(mode="after")
    def _data_exists(self) -> EvaluateConfig:
        require_beir_split(self.data, self.split)
        return self


@flow(name="evaluate", description="Retrieval metrics of models (and BM25) on a BEIR folder.")
def evaluate_flow(config: EvaluateConfig) -> dict:
    """Evaluate every model (and BM25), save the reports as JSON, publish a markdown artifact."""
    from tasks.core.models import resolve_model
    from tasks.core.workspace import check_writable

    logger = get_run_logger()
    check_writable(config.workspace)
    for name in config.models:  # an unknown model stops here, before any work
        resolve_model(name)
    data = read_beir_task(config.data, split=config.split)
    logger.info(
        "%s [%s]: %d queries, %d documents", data.folder, data.split, len(data.queries), len(data.corpus)
    )
    exclude = identical_ids(data)
    if exclude:
        logger.info(
            "%d queries share an id with a document: it is never counted as retrieved for them "
            "(as BEIR's ignore_identical_ids)",
            len(exclude),
        )
    reports: list[EvalReport] = [
        evaluate_model_task(
            name,
            data,
            top_k=config.top_k,
            batch_size=config.batch_size,
            max_seq_length=config.max_seq_length,
            exclude=exclude,
        )
        for name in config.models
    ]
    if config.bm25:
        reports.append(evaluate_bm25_task(data, top_k=config.top_k, exclude=exclude))
    output = config.output or config.workspace / "reports" / f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = save_reports(reports, output)
    publish_markdown(
        f"# Retrieval evaluation\n\n{md(data.folder)} \\[{md(data.split)}\\]: {len(data.queries)} queries, "
        f"{len(data.corpus)} documents\n\n{markdown_table(reports)}\n\nReport: {md_code(path)}",
        key="retrieval-evaluation",
        description="metrics per system",
    )
    logger.info("report written to %s", path)
    return {
        "report": str(path),
        "reports": [r.to_dict() for r in reports],
        "queries": len(data.queries),
        "documents": len(data.corpus),
        "identical_id_queries": len(exclude),
    }
