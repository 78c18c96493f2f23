"""Stage outputs on disk: Parquet parts under a content key, committed by a manifest written last.

Layout: ``<workspace>/<stage>/<key>/part-NNNNN.parquet`` plus ``_COMPLETE`` (JSON: rows, schema,
config, inputs, models, timings). The key hashes the stage name, its config, the keys of its inputs
and the fingerprints of the models it used, so any change gives a new key and nothing stale is
reused. Every file is written under a temporary name and renamed into place, so a part that exists
is whole; a crash leaves the finished parts, and a rerun resumes after them. A reader refuses a
stage without ``_COMPLETE``.

Written by hand because no library of the stack does content-keyed, resumable, part-wise stage
storage: Prefect's result cache stores one pickled return value per task run, which neither
resumes inside a task nor lets another stage read the output as a table.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

MANIFEST = "_COMPLETE"
_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")


class IncompleteStageError(RuntimeError):
    """A stage output was asked for that has not been committed (missing or crashed mid-way)."""


def _canonical(value: Any) -> Any:
    """A JSON-able, order-independent form of a config (paths and sets included)."""
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_canonical(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic models
        return _canonical(value.model_dump(mode="json"))
    return value


def stage_key(
    stage: str,
    config: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    models: Sequence[str] = (),
) -> str:
    """Content key of a stage output: changes whenever the stage, config, inputs or models change."""
    payload = json.dumps(
        {"stage": stage, "config": _canonical(config or {}), "inputs": list(inputs), "models": list(models)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def selection_digest(ids: Sequence[str]) -> str:
    """A short digest of an ordered selection of ids (which queries a stage ran on), for its key."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp_path)`` then rename onto ``path``: readers never see half a file.

    The file gets the mode the umask gives (0644 under the usual 022), as any file opened for
    writing does; ``tempfile.mkstemp``'s 0600 would keep a search service running as another user
    from reading models, cards, stage parts and reports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_temp_file(path: Path) -> Path:
    """A new, empty file next to ``path`` under a unique hidden name, with the umask's mode."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


def copy_tree(source: str | Path, target: str | Path) -> None:
    """Copy a folder to ``target`` (new, in an existing folder), symbolic links followed as in a hub
    snapshot; files and folders get the modes the umask gives, not the source's (``shutil.copytree``
    keeps a 0600 file 0600 and a 0700 folder 0700)."""
    source, target = Path(source), Path(target)
    for folder, _, files in os.walk(source, followlinks=True):
        relative = Path(folder).relative_to(source)
        if os.path.realpath(folder) in {os.path.realpath(source / up) for up in relative.parents}:
            raise OSError(f"cannot copy {source}: {folder} links back to a folder that contains it")
        here = target / relative
        here.mkdir()  # 0777 & ~umask
        for name in files:
            shutil.copyfile(Path(folder) / name, here / name)  # a new file: 0666 & ~umask


def write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp))


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, on_timeout: Callable[[], Exception]) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (fcntl): waits up to ``timeout`` seconds, then raises
    ``on_timeout()``. Released on exit, and by the OS if the process dies.

    The holder may delete the lock file (and its folder) before it lets go, e.g. to leave nothing
    behind after a failed first registration: a waiter that then gets the lock of the deleted file
    notices and locks the file at ``path`` instead, so two holders never run at once."""
    deadline = time.monotonic() + timeout
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = path.open("a")
        except FileNotFoundError:  # the folder was removed between the two steps: again
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            time.sleep(0.2)
            continue
        if _is_at(handle, path):
            break
        handle.close()  # locked a file its holder deleted: lock the one at the path now
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _is_at(handle: Any, path: Path) -> bool:
    """Whether the open file is the one at ``path`` (not one deleted or replaced since)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


@dataclass(frozen=True)
class StageRef:
    """Where a committed stage output lives; small enough to pass between Prefect tasks."""

    stage: str
    key: str
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())


class Store:
    """All stage outputs of one workspace."""

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace)

    def path(self, stage: str, key: str) -> Path:
        return self.workspace / stage / key

    def ref(self, stage: str, key: str) -> StageRef:
        return StageRef(stage, key, self.path(stage, key))

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MANIFEST).is_file()

    def manifest(self, stage: str, key: str) -> dict[str, Any]:
        self._require_complete(stage, key)
        return json.loads((self.path(stage, key) / MANIFEST).read_text())

    def _require_complete(self, stage: str, key: str) -> None:
        if not self.is_complete(stage, key):
            where = self.path(stage, key)
            state = "was started but not finished" if where.exists() else "does not exist"
            raise IncompleteStageError(
                f"stage output {stage}/{key} {state} (no {MANIFEST} in {where}); run the stage to completion first"
            )

    def read(self, stage: str, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        """The whole committed table of a stage; refuses a stage without its manifest."""
        manifest = self.manifest(stage, key)
        where = self.path(stage, key)
        parts = [where / name for name in manifest["parts"]]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise IncompleteStageError(f"stage output {stage}/{key} lists parts that are gone: {missing}")
        tables = [pq.read_table(p, columns=list(columns) if columns else None) for p in parts]
        return pa.concat_tables(tables)

    def read_pandas(self, stage: str, key: str, columns: Sequence[str] | None = None):
        return self.read(stage, key, columns).to_pandas()

    def file(self, stage: str, key: str, name: str) -> Path:
        """A side file (an index, an array) of a committed stage."""
        self._require_complete(stage, key)
        path = self.path(stage, key) / name
        if not path.is_file():
            raise IncompleteStageError(f"stage output {stage}/{key} has no file {name}")
        return path

    def open(
        self,
        stage: str,
        key: str,
        *,
        config: Mapping[str, Any] | None = None,
        inputs: Sequence[str] = (),
        models: Sequence[str] = (),
    ) -> StageWriter:
        """A writer for a stage output; keeps the parts an earlier, interrupted run finished."""
        return StageWriter(self, stage, key, dict(_canonical(config or {})), list(inputs), list(models))

    def write_table(self, stage: str, key: str, table: pa.Table, **writer_kwargs: Any) -> StageRef:
        """Write and commit a one-part stage in one call."""
        writer = self.open(stage, key, **writer_kwargs)
        writer.write_part(0, table)
        return writer.commit()

    def remove(self, stage: str, key: str) -> None:
        shutil.rmtree(self.path(stage, key), ignore_errors=True)

    def keys(self, stage: str) -> list[str]:
        """Committed keys of a stage, oldest first."""
        root = self.workspace / stage
        if not root.is_dir():
            return []
        done = [p for p in root.iterdir() if (p / MANIFEST).is_file()]
        return [p.name for p in sorted(done, key=lambda p: (p / MANIFEST).stat().st_mtime)]


@dataclass
class StageWriter:
    """Writes the parts of one stage output, then commits it.

    Parts are numbered by the caller: part ``i`` always holds the same slice of the input (the
    slicing belongs in the stage's config, hence in its key), so ``has_part(i)`` tells a resumed
    run which slices are already done.
    """

    store: Store
    stage: str
    key: str
    config: dict[str, Any]
    inputs: list[str]
    models: list[str]
    started: float = field(default_factory=time.time)
    resumed_parts: int = 0

    def __post_init__(self) -> None:
        self.path = self.store.path(self.stage, self.key)
        if (self.path / MANIFEST).exists():
            raise FileExistsError(f"stage output {self.stage}/{self.key} is already complete at {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        self.resumed_parts = len(self.done_parts())
        if self.resumed_parts:
            log.info("%s/%s: resuming after %d finished parts", self.stage, self.key, self.resumed_parts)

    def done_parts(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := _PART_RE.match(p.name)))

    def has_part(self, index: int) -> bool:
        return (self.path / part_name(index)).is_file()

    def read_part(self, index: int) -> pa.Table:
        return pq.read_table(self.path / part_name(index))

    def write_part(self, index: int, table: pa.Table) -> None:
        write_parquet_atomic(self.path / part_name(index), table)

    def write_file(self, name: str, write: Callable[[Path], None]) -> Path:
        """A side file written atomically through ``write(tmp_path)``."""
        target = self.path / name
        _atomic_write(target, write)
        return target

    def commit(self, empty_schema: pa.Schema | None = None, **extra: Any) -> StageRef:
        """Write the manifest last; from then on the stage is complete and read-only.

        A stage with no rows still has one (empty) part, so readers always get its schema.
        """
        indices = self.done_parts()
        if not indices:
            if empty_schema is None:
                raise IncompleteStageError(f"stage output {self.stage}/{self.key}: no parts written")
            self.write_part(0, empty_schema.empty_table())
            indices = [0]
        if indices != list(range(len(indices))):
            raise IncompleteStageError(
                f"stage output {self.stage}/{self.key}: parts are not contiguous from 0: {indices}"
            )
        names = [part_name(i) for i in indices]
        rows = 0
        schema: pa.Schema | None = None
        for name in names:
            meta = pq.read_metadata(self.path / name)
            rows += meta.num_rows
            schema = schema or meta.schema.to_arrow_schema()
        manifest = {
            "stage": self.stage,
            "key": self.key,
            "rows": rows,
            "parts": names,
            "schema": {f.name: str(f.type) for f in schema} if schema else {},
            "config": self.config,
            "inputs": self.inputs,
            "models": self.models,
            "timings": {
                "started": self.started,
                "finished": time.time(),
                "seconds": round(time.time() - self.started, 3),
                "resumed_parts": self.resumed_parts,
            },
            **extra,
        }
        write_json_atomic(self.path / MANIFEST, manifest)
        return StageRef(self.stage, self.key, self.path)


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def chunked(items: Sequence[Any], size: int) -> Iterable[tuple[int, Sequence[Any]]]:
    """(part index, slice) pairs: the deterministic slicing that parts are numbered by."""
    if size < 1:
        raise ValueError("part size must be at least 1")
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start : start + size]
