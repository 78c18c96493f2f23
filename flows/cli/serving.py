"""`adapt models`, `adapt search` and `adapt export`: the registry and serving from a shell.

Each command's options come from its pydantic config below, as the flows' commands do (the single
source of their defaults and help texts).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.cli.options import add_model_options, build_config
from flows.cli.terminal import console, messages, table
from tasks.core.defaults import CATALOG_CLIP_MODEL_NAME, DEFAULT_WORKSPACE, TEXT_MODEL_NAME


def _positional(description: str, default: Any = ...) -> Any:
    return Field(default, description=description, json_schema_extra={"positional": True})


class RegistryConfig(BaseModel):
    """Settings of `adapt models list`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workspace: Path = Field(DEFAULT_WORKSPACE, description="workspace folder holding models/")


class VersionConfig(RegistryConfig):
    """Settings of `adapt models show` and `adapt models rollback`."""

    name: str = _positional(f"registered model name, e.g. {TEXT_MODEL_NAME}")
    version: str | None = _positional("version, e.g. v0002 (default: the current one)", None)


class PromoteConfig(VersionConfig):
    """Settings of `adapt models promote`."""

    version: str = _positional("version to make current, e.g. v0002")
    reason: str = Field("promoted by hand", description="recorded in the history")


class SearchConfig(BaseModel):
    """Settings of `adapt search`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    query: str = _positional("the query text")
    top_k: int = Field(10, ge=1, description="hits to show")
    images: bool = Field(
        False, description="search the catalog's product images with the image/text model (adapt clip)"
    )
    model_name: str | None = Field(
        None,
        description=f"registered model (none: {TEXT_MODEL_NAME}, or {CATALOG_CLIP_MODEL_NAME} with --images)",
    )
    corpus: Path | None = Field(
        None,
        description="search this corpus (or catalog, with --images) instead of the "
        "one recorded on the model's card",
    )
    mode: Literal["dense", "hybrid"] | None = Field(
        None,
        description="text search: dense (the model alone) or hybrid (fused with BM25); none: what the "
        "version serves (its card: the mode `adapt text` measured better)",
    )
    workspace: Path = Field(DEFAULT_WORKSPACE, description="workspace folder holding models/")
    as_json: bool = Field(False, description="print the hits as JSON", json_schema_extra={"flag": "--json"})

    @field_validator("query")
    @classmethod
    def _a_query(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("the query is empty; give the text to search for")
        return query

    def served_model(self) -> str:
        return self.model_name or (CATALOG_CLIP_MODEL_NAME if self.images else TEXT_MODEL_NAME)


class ExportConfig(BaseModel):
    """Settings of `adapt export`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    onnx: bool = Field(False, description="export to ONNX (the only format; required)")
    int8: bool = Field(False, description="also write an int8 (dynamic quantisation) model")
    model_name: str = Field(TEXT_MODEL_NAME, description="registered model")
    version: str | None = Field(None, description="version to export (none: the current one)")
    output: Path | None = Field(None, description="output folder (none: <the version's folder>/onnx)")
    min_cosine: float = Field(
        0.99,
        gt=0,
        le=1,
        description="parity threshold: every sample text's embedding "
        "must have at least this cosine with PyTorch's",
    )
    workspace: Path = Field(DEFAULT_WORKSPACE, description="workspace folder holding models/")

    @model_validator(mode="after")
    def _a_format(self) -> ExportConfig:
        if not self.onnx:
            raise ValueError("name the format: --onnx (the only one)")
        return self


MODELS_ACTIONS = {
    "list": (RegistryConfig, "every registered model and its versions (* = current)"),
    "show": (VersionConfig, "one version's card (default: the current version)"),
    "promote": (PromoteConfig, "make a version current by hand (no gate)"),
    "rollback": (VersionConfig, "make the previously served version current again"),
}


def add_serving_parsers(commands) -> None:
    models = commands.add_parser(
        "models",
        help="list, show, promote or roll back registered model versions",
        description="The model registry: versions with their cards (base model, data, config, metrics) and "
        "the `current` pointer that search and the next adaptation use.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, (config, summary) in MODELS_ACTIONS.items():
        sub = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        add_model_options(sub, config, skip={"version"} if name == "rollback" else None)
        sub.set_defaults(handler=_models, config_model=config)

    search = commands.add_parser(
        "search",
        help="search the corpus with the current model of the registry",
        description="Search the corpus a model was adapted on with its current version. The FAISS index is "
        "saved next to the model version and built on first use (again when current changes "
        "or the corpus changed).",
    )
    add_model_options(search, SearchConfig)
    search.set_defaults(handler=_search, config_model=SearchConfig)

    export = commands.add_parser(
        "export",
        help="export a registered model to ONNX (optionally int8) and check it matches PyTorch",
        description="Export a registered model version to ONNX, optionally also an int8 quantised copy, check "
        "parity with the PyTorch model on sample texts (cosine >= --min-cosine for every text) and "
        "report the size and encode speed of each. Fails, keeping nothing, if parity fails.",
    )
    add_model_options(export, ExportConfig)
    export.set_defaults(handler=_export, config_model=ExportConfig)


def _console():
    return console()


def _note(text: str) -> None:
    messages().print(text)


def _models(args: argparse.Namespace) -> int:

    from tasks.core.registry import Registry

    config = build_config(args.config_model, args)
    registry = Registry(config.workspace)
    console = _console()
    if args.action == "list":
        names = registry.names()
        if not names:
            _note(f"no models registered in {registry.root}")
            return 0
        grid = table("model", "version", "current", "nDCG@10 before", "nDCG@10 after", "eval set")
        for name in names:
            current = registry.current(name)
            for version in registry.versions(name):
                card = registry.card(name, version)
                before, after = card.get("metrics_before", {}), card.get("metrics_after", {})
                grid.add_row(
                    name,
                    version,
                    "*" if version == current else "",
                    _fmt(before.get("nDCG@10")),
                    _fmt(after.get("nDCG@10")),
                    str(card.get("eval_set", "")),
                )
        console.print(grid)
    elif args.action == "show":
        version = config.version or registry.current(config.name)
        console.print_json(
            json.dumps(
                {"current": registry.current(config.name), **registry.card(config.name, version)}, default=str
            )
        )
    elif args.action == "promote":
        decision = registry.promote(config.name, config.version, reason=config.reason)
        console.print(f"{config.name}: {decision.version} is current (was {decision.previous or 'none'})")
    else:
        decision = registry.rollback(config.name)
        console.print(f"{config.name}: {decision.reason}")
    return 0


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _search(args: argparse.Namespace) -> int:
    config: SearchConfig = build_config(SearchConfig, args)  # type: ignore[assignment]
    model_name = config.served_model()
    if config.images:
        from tasks.serving.search import ImageSearcher

        searcher = ImageSearcher(config.workspace, model_name, catalog=config.corpus)
    else:
        from tasks.serving.search import Searcher

        searcher = Searcher(config.workspace, model_name, corpus=config.corpus, mode=config.mode)
    hits = searcher.search(config.query, k=config.top_k)
    if config.as_json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
        return 0
    grid = table(
        "#",
        "score",
        "doc_id",
        "title / text",
        *(["image"] if config.images else []),
        title=f"{model_name} {searcher.version}"
        + ("" if config.images else f" ({searcher.mode})")
        + f": {config.query}",
        right=("#", "score"),
    )
    for rank, hit in enumerate(hits, 1):
        extra = [hit.snippet] if config.images else []
        grid.add_row(str(rank), f"{hit.score:.3f}", hit.doc_id, (hit.title or hit.snippet)[:90], *extra)
    _console().print(grid)
    return 0


def _export(args: argparse.Namespace) -> int:
    from tasks.core.onnx import export_onnx
    from tasks.core.registry import Registry

    config: ExportConfig = build_config(ExportConfig, args)  # type: ignore[assignment]
    registry = Registry(config.workspace)
    source = registry.path(config.model_name, config.version)
    output = config.output or source / "onnx"
    summary = export_onnx(source, output, int8=config.int8, min_cosine=config.min_cosine)
    grid = table(
        "model",
        "file",
        "size MB",
        "texts/s",
        "min cosine vs PyTorch",
        title=f"{config.model_name} {source.name} -> {output}",
        right=("size MB", "texts/s", "min cosine vs PyTorch"),
    )
    grid.add_row(
        "PyTorch",
        "model.safetensors",
        f"{summary['pytorch']['size_mb']:.1f}",
        f"{summary['pytorch']['texts_per_second']:.0f}",
        "",
    )
    for variant in ("fp32", "int8"):
        if variant in summary:
            row = summary[variant]
            grid.add_row(
                f"ONNX {variant}",
                row["file"],
                f"{row['size_mb']:.1f}",
                f"{row['texts_per_second']:.0f}",
                f"{row['min_cosine']:.4f}",
            )
    _console().print(grid)
    documents = registry.card(config.model_name, source.name).get("document_model")
    if documents:
        _note(
            f"{source.name} adapted only its query side: documents are encoded by {documents} "
            f"(export it too: adapt export --onnx --version {Path(documents).name})"
        )
    return 0
