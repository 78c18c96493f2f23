"""A Dask worker plugin that kills its worker's process in the middle of a part, once per test.

Lives in a module of its own (not a test file) so the worker processes import it by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from distributed import WorkerPlugin


class KillWorkerOnce(WorkerPlugin):
    """Counts the tasks that start executing on any worker (a file each, in ``folder``); the worker
    that starts task number ``at`` dies at once (``os._exit``, as a killed process: no cleanup,
    nothing written), after writing ``killed``. Only one worker ever dies."""

    name = "kill-worker-once"

    def __init__(self, folder: str, at: int):
        self.folder, self.at = folder, at

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing":
            return
        folder = Path(self.folder)
        for number in range(1, 1000):
            try:  # O_EXCL: two workers never take the same number
                os.close(os.open(folder / f"started-{number:03d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                continue
        if number == self.at:
            try:
                os.close(os.open(folder / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            (folder / "killed").write_text(f"{os.getpid()} {key}")
            os._exit(1)
