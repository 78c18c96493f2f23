"""The commands that run a flow: `adapt text | evaluate | supervised | clip | refresh`.

Each builds its flow's config from the options (see :mod:`flows.cli.options`), runs the flow (which
checks its inputs once, so a deployment gets the same checks) and prints the flow's report.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from flows.cli.options import build_config
from flows.cli.terminal import console, messages, styled, table


def _markdown(text: str):
    from rich.markdown import Markdown

    return Markdown(text)


def _run_with_progress(label: str, function, *args):
    """Run a flow with a spinner and elapsed time on a terminal's stderr (stage progress is in the logs)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    notes = messages()
    if not notes.is_terminal:
        return function(*args)
    with Progress(
        SpinnerColumn(),
        TextColumn(label, style="bold", markup=False),
        TimeElapsedColumn(),
        console=notes,
        transient=True,
    ) as progress:
        progress.add_task(label, total=None)
        return function(*args)


def _before_after(title: str, before: dict, after: dict):
    """A table of metrics before and after, with the change."""
    grid = table("metric", "before", "after", "change", title=title, right=("before", "after", "change"))
    for name, value in after.items():
        grid.add_row(name, f"{before[name]:.4f}", f"{value:.4f}", f"{value - before[name]:+.4f}")
    return grid


def evaluate_command(args: argparse.Namespace) -> int:
    from flows.evaluate import EvaluateConfig, evaluate_flow
    from tasks.core.evaluation import EvalReport, rich_table

    config = build_config(EvaluateConfig, args, args.config)
    result = _run_with_progress("evaluating", evaluate_flow, config)
    reports = [EvalReport.from_dict(r) for r in result["reports"]]
    out = console()
    out.print(
        styled(
            (str(config.data), "bold"),
            f" [{config.split}]: {result['queries']} queries, {result['documents']} documents",
        )
    )
    out.print(rich_table(reports, title=f"Retrieval evaluation: {config.data} [{config.split}]"))
    out.print(f"report: {result['report']}")
    return 0


def text_command(args: argparse.Namespace) -> int:
    from flows.adapt_text import AdaptTextConfig, adapt_text_flow

    config = build_config(AdaptTextConfig, args, args.config)
    messages().print(
        styled(
            (str(config.corpus), "bold"),
            f": adapting {config.base_model} as '{config.model_name}' in {config.workspace}",
        )
    )
    result = _run_with_progress("adapting", adapt_text_flow, config)
    out = console()
    out.print(_markdown(result["markdown"]))
    out.print(f"report: {result['report']}")
    return 0


def refresh_command(args: argparse.Namespace) -> int:
    from flows.catalog_refresh import RefreshConfig, catalog_refresh_flow

    config = build_config(RefreshConfig, args, args.config)
    messages().print(
        styled((str(config.catalog), "bold"), f": refreshing '{config.model_name}' in {config.workspace}")
    )
    result = _run_with_progress("refreshing", catalog_refresh_flow, config)
    out = console()
    changes = result["changes"]
    out.print(
        f"new {changes['new']}, changed {changes['changed']}, removed {changes['removed']}, "
        f"unchanged {changes['unchanged']}"
    )
    if not result["changed"]:
        out.print(result["message"])
    elif "decision" in result:
        out.print(f"{result['model']} {result.get('version')}: {result['decision']}")
    out.print(
        f"serving: {result.get('serving') or result.get('current_before')}; "
        f"{result['total_seconds']:.0f} s" + (f"; report: {result['report']}" if "report" in result else "")
    )
    return 0


def supervised_command(args: argparse.Namespace) -> int:
    from flows.judged import is_judged
    from flows.supervised import SupervisedConfig, supervised_flow

    config = build_config(SupervisedConfig, args, args.config)
    judged = is_judged(config)
    carved = "of the queries" if judged else "no shared text"
    evaluation = config.eval or f"{config.eval_fraction:.0%} carved off, {carved}"
    messages().print(
        styled(
            (str(config.train), "bold"),
            (" (judged queries over a corpus)" if judged else "")
            + f": evaluation: {evaluation}"
            + (f"; search: {config.search} trials" if config.search else ""),
        )
    )
    result = _run_with_progress("fine-tuning", supervised_flow, config)
    out = console()
    if judged:
        out.print(_markdown(result["markdown"]))
        out.print(f"report: {result['report']}")
        return 0
    out.print(
        _before_after(
            f"Supervised fine-tuning: {config.model_name} {result['version']} ({result['loss']})",
            result["metrics_before"],
            result["metrics_after"],
        )
    )
    out.print(result["decision"])
    out.print(f"report: {result['report']}")
    return 0


def clip_command(args: argparse.Namespace) -> int:
    from flows.adapt_clip import ClipConfig, adapt_clip_flow

    config = build_config(ClipConfig, args, args.config)
    messages().print(styled((str(config.catalog), "bold"), f": adapting {config.model}"))
    result = _run_with_progress("adapting", adapt_clip_flow, config)
    out = console()
    out.print(
        _before_after(
            f"Held-out products of {config.catalog}", result["metrics_before"], result["metrics_after"]
        )
    )
    if result["left_out"]:
        out.print(
            styled((f"{len(result['left_out'])} product(s) left out", "yellow"), " (listed in the report)")
        )
    out.print(
        f"model: {result['model_dir']}\nregistry: {result['version']}: {result['promotion']}\n"
        f"report: {result['report']}\ntop images: {result['grid']}"
    )
    return 0


def _config(module: str, name: str) -> Callable[[], type]:
    def load() -> type:
        import importlib

        return getattr(importlib.import_module(module), name)

    return load


# name, one-line help, the config model (imported on use: flows load Prefect), handler
FLOW_COMMANDS: list[tuple[str, str, Callable[[], type], Callable[[argparse.Namespace], int]]] = [
    (
        "text",
        "adapt a bi-encoder to a corpus with no labels (GPL: generated queries, mined negatives, "
        "teacher margins, MarginMSE), evaluate before/after and promote if better",
        _config("flows.adapt_text", "AdaptTextConfig"),
        text_command,
    ),
    (
        "evaluate",
        "retrieval metrics (nDCG@10, MRR@10, MAP, Recall, P@10, Hit@10, R-precision) "
        "of models and BM25 on a BEIR folder",
        _config("flows.evaluate", "EvaluateConfig"),
        evaluate_command,
    ),
    (
        "supervised",
        "fine-tune an embedding model from labelled pairs, label groups or (query, positive) "
        "rows, optionally with a hyper-parameter search (--search N)",
        _config("flows.supervised", "SupervisedConfig"),
        supervised_command,
    ),
    (
        "clip",
        "adapt an image/text model to a product catalog from its own images and texts (no labels): "
        "text queries find product images",
        _config("flows.adapt_clip", "ClipConfig"),
        clip_command,
    ),
    (
        "refresh",
        "incremental adaptation of a catalog's text retriever: only new and changed products get "
        "queries and labels; promote if better; keep the search index in step (the nightly job)",
        _config("flows.catalog_refresh", "RefreshConfig"),
        refresh_command,
    ),
]
