"""The report of a hyper-parameter search: a markdown table of the trials and a plot of the objective."""

from __future__ import annotations

from pathlib import Path

from finetune.hparam_search import PARAMS, SearchResult
from tasks.core.markdown import md


def _value(result: SearchResult, t: dict) -> str:
    """A trial's objective (its last intermediate one in brackets when it did not finish); the best in bold."""
    value = (
        f"{t['value']:.4f}"
        if t["value"] is not None
        else (f"({list(t['intermediate'].values())[-1]:.4f})" if t["intermediate"] else "")
    )
    return f"**{value}**" if t["number"] == result.best_trial else value


def _label(t: dict) -> str:
    return (
        f"{t['number']}"
        + (" (defaults)" if t["default"] else "")
        + (f" (retry of {t['retry_of']})" if t["retry_of"] is not None else "")
    )


def trials_markdown(result: SearchResult) -> str:
    """One row per trial: state, parameters, the objective and time; the best in bold."""
    if list(result.params) != list(PARAMS):
        return _params_markdown(result)
    lines = [
        f"| trial | state | model | loss | learning rate | batch | epochs | warm-up | hard negatives "
        f"| {result.metric} | seconds |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result.trials:
        value, label = _value(result, t), _label(t)
        lr = f"{t['learning_rate']:.2e}" if t["learning_rate"] is not None else ""
        warmup = f"{t['warmup_ratio']:.2f}" if t["warmup_ratio"] is not None else ""
        model = md(Path(str(t["model"])).name) if t["model"] else ""
        seconds = f"{t['seconds']:.0f}" if t["seconds"] else ""
        lines.append(
            f"| {label} | {t['state'].lower()} | {model} | {md(t['loss'] or '')} | {lr} | {t['batch_size'] or ''} "
            f"| {t['epochs'] or ''} | {warmup} | {'' if t.get('hard_negatives') is None else t['hard_negatives']} "
            f"| {value} | {seconds} |"
        )
    return "\n".join(lines)


def _params_markdown(result: SearchResult) -> str:
    """The trials table of a search over other parameters than supervised training's: one column each."""
    lines = [
        "| trial | state | "
        + " | ".join(md(p.replace("_", " ")) for p in result.params)
        + f" | {result.metric} | seconds |",
        "|---:|---|" + "---:|" * len(result.params) + "---:|---:|",
    ]
    for t in result.trials:
        cells = [f"{t[p]:.3g}" if isinstance(t.get(p), float) else str(t.get(p) or "") for p in result.params]
        seconds = f"{t['seconds']:.0f}" if t["seconds"] else ""
        lines.append(
            f"| {_label(t)} | {t['state'].lower()} | "
            + " | ".join(cells)
            + f" | {_value(result, t)} | {seconds} |"
        )
    return "\n".join(lines)


def plot_trials(result: SearchResult, path: str | Path) -> Path:
    """The objective of each finished trial and the best so far, as a PNG."""
    from tasks.core.report import plot_series

    done = [(t["number"], t["value"]) for t in result.trials if t["value"] is not None]
    best: list[tuple[float, float]] = []
    for number, value in done:
        best.append((number, max(value, best[-1][1]) if best else value))
    pruned = [
        (t["number"], list(t["intermediate"].values())[-1])
        for t in result.trials
        if t["state"] == "PRUNED" and t["intermediate"]
    ]
    series = {"objective": done, "best so far": best}
    if pruned:
        series["pruned (last value)"] = pruned
    return plot_series(
        series,
        path,
        title=f"Search: {result.metric} on the validation set per trial",
        xlabel="trial",
        ylabel=result.metric,
    )
