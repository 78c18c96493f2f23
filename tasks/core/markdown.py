"""Data into markdown, safely: every report and Prefect artifact the product writes is markdown, and
the Prefect UI renders it, so a title, a query, a product id or a path must never become markup.

:func:`md` escapes HTML (``&``, ``<``, ``>`` as entities) and the markdown characters that change
meaning (backslash, backtick, ``*``, ``_``, brackets, ``|`` that would split a table cell, ``#``), and
folds line breaks, so ``<img src=x onerror=alert(1)>|pwn`` shows as that text in one table cell.
"""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_\[\]|#~])")


def md(value: object) -> str:
    """``value`` as literal text inside markdown (a table cell, a line, a list item)."""
    text = html.escape(str(value), quote=False)
    text = _SPECIAL.sub(r"\\\1", text)
    return " ".join(text.splitlines())


def md_code(value: object) -> str:
    """``value`` as inline code (a path): backticks inside are replaced, nothing else is read."""
    text = " ".join(str(value).replace("`", "'").splitlines())
    return f"`{text}`"
