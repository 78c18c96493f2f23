"""The terminal the commands print to."""

from __future__ import annotations


def console():
    """A Rich console on standard output."""
    from rich.console import Console

    return Console(stderr=False)
