"""Wall time and item counts per stage, for every flow's report (one stage timer for all of them)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from tasks.core.workspace import DiskFullError, disk_full, is_disk_full


class Stopwatch:
    """Records ``{stage: {"seconds": s, "items": n}}`` in the order stages ran.

    ``run(name, items, function, *args)`` times a call; ``with stage(name) as record:`` times a block
    whose item count is known only at its end (``record["items"] = n``). A full disk inside a stage
    becomes a :class:`tasks.core.workspace.DiskFullError` that names the stage.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.began = time.time()

    def run(
        self, name: str, items: int | None, function: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        with self.stage(name, items):
            return function(*args, **kwargs)

    @contextlib.contextmanager
    def stage(self, name: str, items: int | None = None) -> Iterator[dict[str, Any]]:
        record: dict[str, Any] = {"seconds": 0.0, "items": items}
        start = time.time()
        try:
            yield record
        except OSError as exc:  # a full disk: say which stage, keep what is finished (writes are atomic)
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise disk_full(exc, stage=name) from None
            raise
        finally:
            record["seconds"] = round(time.time() - start, 2)
            self.stages[name] = record

    def total(self) -> float:
        return round(time.time() - self.began, 1)
