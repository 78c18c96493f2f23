"""The workspace a run writes to: checked writable before any work, and a full disk named plainly.

* :func:`check_writable` creates the folder if needed and writes (then removes) a probe file, so an
  unwritable or read-only workspace stops the run at its start with :class:`WorkspaceError`;
* :func:`disk_full` turns an ``ENOSPC`` while writing into :class:`DiskFullError`, which says which
  stage was writing what, how much space is free and at least how much more is needed. Every write
  of the product is atomic (a temporary name renamed into place), so a full disk leaves finished
  parts and files whole and nothing half-written.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path


class WorkspaceError(OSError):
    """The workspace cannot be written."""


class DiskFullError(OSError):
    """The disk filled up while a stage was writing."""

    def __init__(self, message: str, *, stage: str | None = None, path: str | None = None):
        super().__init__(errno.ENOSPC, message)
        self.stage, self.path, self.message = stage, path, message

    def __str__(self) -> str:
        return self.message


def check_writable(workspace: str | Path) -> Path:
    """The workspace folder, created if missing; :class:`WorkspaceError` if it cannot be written."""
    folder = Path(workspace)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise WorkspaceError(
            exc.errno or errno.EACCES,
            f"{folder}: the workspace is not writable ({exc.strerror or exc}); "
            "choose another --workspace or fix its permissions",
        ) from None
    return folder


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full(
    exc: OSError, *, stage: str | None, path: str | Path | None = None, needed_bytes: int | None = None
) -> DiskFullError:
    """A :class:`DiskFullError` for an ``ENOSPC`` raised while ``stage`` wrote ``path``."""
    where = Path(path or exc.filename or ".")
    free = _free_bytes(where)
    parts = [f"no space left on the device while {f'stage {stage!r}' if stage else 'writing'} wrote {where}"]
    if free is not None:
        parts.append(f"{free / 2**20:.0f} MB free")
    if needed_bytes:
        parts.append(f"it needs at least {needed_bytes / 2**20:.1f} MB more")
    parts.append("finished parts are kept: free some space and run again to resume")
    return DiskFullError("; ".join(parts), stage=stage, path=str(where))


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
