"""The terminal the commands print to: results on standard output, everything else on standard error.

Data never reaches the terminal as markup: the consoles have Rich markup off, so a query, a title,
a product name or a path is printed as it is (``tumor [/b] growth`` stays that text). Styled words
are built with :func:`styled`. Table columns fold long values instead of cutting them.
"""

from __future__ import annotations

from typing import Any


def console():
    """The console for results (standard output)."""
    from rich.console import Console

    return Console(markup=False, highlight=False)


def messages():
    """The console for errors, progress and notes (standard error), so stdout carries only the result."""
    from rich.console import Console

    return Console(stderr=True, markup=False, highlight=False)


def styled(*parts: str | tuple[str, str]) -> Any:
    """A line from plain strings and (text, style) pairs; the text is never read as markup."""
    from rich.text import Text

    return Text.assemble(*parts)


def table(*columns: str, title: str | None = None, right: tuple[str, ...] = ()) -> Any:
    """A Rich table whose columns fold long values (a model name or a path is never cut short)."""
    from rich.table import Table

    grid = Table(title=title)
    for name in columns:
        grid.add_column(name, overflow="fold", justify="right" if name in right else "left")
    return grid
