"""Model registry: versions with their cards, a `current` pointer, a promotion gate, rollback.

Layout under ``<workspace>/models/<name>/``:
``<version>/`` (a model directory + ``card.json``), ``current`` (the promoted version's name),
``history.jsonl`` (every promotion and rollback), ``.lock`` (held while the registry is changed).

A version directory is copied under a temporary name and renamed into place, and ``current`` is
replaced atomically, so a crash at any point leaves the previous ``current`` serving. Changes take
an exclusive lock: a second writer waits up to ``lock_timeout`` seconds, then fails cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.store import copy_tree, file_lock, write_json_atomic

CARD = "card.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def document_model_of(model_dir: str | Path) -> str | None:
    """The model that encodes the documents of a registry version's directory, when the version
    adapted only its query side (its card says which model kept the document side); None for any
    other model (a plain model directory, a version that trained both sides, a hub name)."""
    card = Path(model_dir) / CARD
    if not card.is_file():
        return None
    return json.loads(card.read_text()).get("document_model")


class RegistryError(RuntimeError):
    """A registry request that cannot be done (unknown name or version, nothing to roll back to)."""


class RegistryLockedError(RegistryError):
    """Another process holds the registry lock for longer than we were willing to wait."""


@dataclass(frozen=True)
class Promotion:
    """The promotion gate's decision and why."""

    promoted: bool
    version: str
    previous: str | None
    reason: str


class Registry:
    """All registered models of a workspace."""

    def __init__(self, workspace: str | Path, *, lock_timeout: float = 600.0):
        self.root = Path(workspace) / "models"
        self.lock_timeout = lock_timeout

    # ------------------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if _VERSION_RE.match(p.name) and (p / CARD).is_file()]
        return sorted(found, key=lambda v: int(v[1:]))

    def path(self, name: str, version: str | None = None) -> Path:
        """Directory of a version (default: the current one)."""
        version = version or self.current(name)
        if version is None:
            raise RegistryError(f"model '{name}' has no current version (nothing promoted yet)")
        path = self.root / name / version
        if not (path / CARD).is_file():
            raise RegistryError(f"model '{name}' has no version '{version}'; versions: {self.versions(name)}")
        return path

    def card(self, name: str, version: str | None = None) -> dict[str, Any]:
        return json.loads((self.path(name, version) / CARD).read_text())

    def document_model(self, name: str, version: str | None = None) -> str:
        """Directory of the model that encodes a version's documents: the version itself, or for a
        version that adapted only its query side, the one whose document side it kept (its card says)."""
        return document_model_of(self.path(name, version)) or str(self.path(name, version))

    def current(self, name: str) -> str | None:
        pointer = self.root / name / "current"
        return pointer.read_text().strip() if pointer.is_file() else None

    def history(self, name: str) -> list[dict[str, Any]]:
        log = self.root / name / "history.jsonl"
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def lock(self, name: str, *, create: bool = True) -> Iterator[None]:
        """Exclusive lock on one model's registry entries (waits, then RegistryLockedError).

        With ``create=False`` (promote, rollback) a name that has no folder is a RegistryError before
        anything is written. When the operation fails and leaves the model's folder holding nothing
        but its ``.lock``, what the lock made (that folder, the ``.lock``, an emptied ``models/``) is
        removed again.
        """
        _check_name(name)
        folder = self.root / name
        if not create and not folder.is_dir():
            raise RegistryError(self._not_registered(name))
        timeout = self.lock_timeout
        with file_lock(
            folder / ".lock",
            timeout,
            lambda: RegistryLockedError(
                f"registry of '{name}' is locked by another run (waited {timeout:.0f} s); "
                "try again when it finishes"
            ),
        ):
            try:
                yield
            except BaseException:
                self._remove_if_empty(name)
                raise

    def _not_registered(self, name: str) -> str:
        known = self.names()
        return f"model '{name}' is not registered in {self.root}" + (
            f" (registered models: {', '.join(known)})" if known else " (no model is registered yet)"
        )

    def _remove_if_empty(self, name: str) -> None:
        """Remove a model's folder that holds nothing but its lock (the lock is still held, see
        :func:`tasks.core.store.file_lock`), and ``models/`` if that leaves it empty."""
        folder = self.root / name
        try:
            if {p.name for p in folder.iterdir()} <= {".lock"}:
                (folder / ".lock").unlink(missing_ok=True)
                folder.rmdir()
                self.root.rmdir()
        except OSError:  # not empty (another model, another writer): keep it
            pass

    def register(self, name: str, model_dir: str | Path, card: Mapping[str, Any]) -> str:
        """Copy a trained model in as the next version (not promoted); returns the version."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise RegistryError(f"cannot register {model_dir}: not a directory")
        with self.lock(name):
            existing = [int(v[1:]) for v in self.versions(name)]
            version = f"v{(max(existing) + 1 if existing else 1):04d}"
            target = self.root / name / version
            staging = self.root / name / f".{version}.tmp-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                # files and folders get the umask's modes, not the source's: a search service running
                # as another user reads the registry
                copy_tree(model_dir, staging)
                full_card = {"name": name, "version": version, "registered": time.time(), **card}
                write_json_atomic(staging / CARD, full_card)
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return version

    def promote_if_better(
        self,
        name: str,
        version: str,
        *,
        new_score: float,
        current_score: float,
        metric: str,
        min_delta: float = 0.0,
    ) -> Promotion:
        """Make ``version`` current only if it beats the model it would replace on the same evaluation.

        ``current_score`` is the score of the current version (or of the base model when nothing is
        promoted yet) measured on the same evaluation set as ``new_score``.
        """
        with self.lock(name, create=False):
            previous = self.current(name)
            self.path(name, version)  # exists?
            if new_score > current_score + min_delta:
                self._set_current(
                    name, version, previous, "promoted", f"{metric} {new_score:.4f} > {current_score:.4f}"
                )
                return Promotion(
                    True, version, previous, f"{metric} improved from {current_score:.4f} to {new_score:.4f}"
                )
            reason = (
                f"not promoted: {metric} {new_score:.4f} does not beat "
                f"{current_score:.4f} of {previous or 'the base model'}"
                + (f" by more than {min_delta}" if min_delta else "")
            )
            self._log(name, {"event": "rejected", "version": version, "current": previous, "reason": reason})
            return Promotion(False, version, previous, reason)

    def register_and_gate(
        self,
        name: str,
        model_dir: str | Path,
        card: Mapping[str, Any],
        *,
        new_score: float,
        current_score: float,
        metric: str,
        min_delta: float = 0.0,
        promote: bool = True,
    ) -> Promotion:
        """Register ``model_dir`` as the next version of ``name``, then let the gate decide.

        Every flow ends with this: the version is always kept (with its card, for the record), and
        becomes current only if ``new_score`` beats ``current_score`` (the current version's, or the
        base model's, on the same evaluation set) by more than ``min_delta``. ``promote=False``
        registers only.
        """
        version = self.register(name, model_dir, card)
        if not promote:
            return Promotion(
                False, version, self.current(name), "not promoted: promotion is off (--no-promote)"
            )
        return self.promote_if_better(
            name,
            version,
            new_score=new_score,
            current_score=current_score,
            metric=metric,
            min_delta=min_delta,
        )

    def promote(self, name: str, version: str, *, reason: str = "promoted by hand") -> Promotion:
        """Make a version current without the gate (a person decided)."""
        with self.lock(name, create=False):
            previous = self.current(name)
            self.path(name, version)
            self._set_current(name, version, previous, "promoted", reason)
            return Promotion(True, version, previous, reason)

    def rollback(self, name: str) -> Promotion:
        """Make the version that was current before the present one current again."""
        with self.lock(name, create=False):
            present = self.current(name)
            if present is None:
                raise RegistryError(f"model '{name}' has no current version to roll back from")
            # the version that was current when the present one was (last) promoted
            earlier = [
                e.get("previous")
                for e in self.history(name)
                if e["event"] == "promoted" and e["version"] == present
            ]
            if not earlier or not earlier[-1]:
                raise RegistryError(
                    f"model '{name}': nothing was served before {present}; nothing to roll back to"
                )
            target = earlier[-1]
            self._set_current(name, target, present, "rolled back", f"rolled back from {present}")
            return Promotion(True, target, present, f"rolled back from {present} to {target}")

    def _set_current(self, name: str, version: str, previous: str | None, event: str, reason: str) -> None:
        pointer = self.root / name / "current"
        tmp = pointer.with_name(f".current.tmp-{os.getpid()}")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)
        self._log(name, {"event": event, "version": version, "previous": previous, "reason": reason})

    def _log(self, name: str, entry: dict[str, Any]) -> None:
        with (self.root / name / "history.jsonl").open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **entry}) + "\n")


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise RegistryError(f"model name '{name}' must be letters, digits, '.', '_' or '-'")
