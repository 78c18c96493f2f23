"""The temporary Prefect server a command starts when no ``PREFECT_API_URL`` is set, never orphaned.

Prefect starts its ephemeral server (uvicorn) as a child process and stops it at interpreter exit.
A SIGTERM of the command skips that exit, and a SIGKILL skips everything, so the server lived on.
Here the command starts the server itself, before the flow, so that:

* the child gets ``PR_SET_PDEATHSIG`` (Linux): the kernel stops it when the command dies, even by
  SIGKILL;
* SIGTERM (and SIGHUP) become a normal exit of the command, which stops the server;
* every server started is recorded in ``<PREFECT_HOME>/adapt-servers/<pid>.json``; the next command
  stops any recorded server whose command has died (a server left behind on a system without the
  death signal), so servers never stack up.

Prefect reuses a running ephemeral server (one per process), so the flow talks to this one.
Written by hand because Prefect offers no option for either: its server is started on demand by
the client and only an interpreter exit stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_SERVER_MARK = "prefect.server.api.server:create_app"


def records_folder() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "adapt-servers"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_prefect_server(pid: int) -> bool:
    """Whether ``pid`` is a running temporary Prefect server (by its command line)."""
    try:
        return _SERVER_MARK in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def stop_orphans() -> int:
    """Stop the recorded servers whose command is gone; returns how many were stopped."""
    folder = records_folder()
    stopped = 0
    for record in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if _alive(int(info.get("parent", 0))):
            continue  # its command still runs: not an orphan
        pid = int(info.get("pid", 0))
        if pid and _alive(pid) and is_prefect_server(pid):
            log.warning("stopping the temporary Prefect server (pid %d) that an earlier run left behind", pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
            stopped += 1
        record.unlink(missing_ok=True)
    return stopped


def _prctl():
    """libc's prctl, looked up before any fork (the child must not load libraries)."""
    with contextlib.suppress(Exception):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


def _death_signal(prctl):
    def die_with_parent() -> None:  # runs in the child between fork and exec: no imports, no allocation
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return die_with_parent


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _drain_prefect_workers() -> None:
    """Let Prefect send its queued logs and events before the server goes (else it reports a failed
    connection at exit)."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    with contextlib.suppress(Exception):
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=10)


@contextlib.contextmanager
def temporary_server() -> Iterator[None]:
    """A temporary Prefect server for the duration of a command (nothing when PREFECT_API_URL is set)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api import server as prefect_server

    stop_orphans()
    previous = {s: signal.signal(s, _exit_on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    real_popen = subprocess.Popen

    prctl = _prctl() if sys.platform.startswith("linux") else None

    def popen(*args, **kwargs):
        if prctl is not None:
            kwargs.setdefault("preexec_fn", _death_signal(prctl))
        return real_popen(*args, **kwargs)

    server = prefect_server.SubprocessASGIServer()
    record = None
    try:
        with mock.patch.object(prefect_server.subprocess, "Popen", popen):
            server.start()
        if server.server_process is not None:
            folder = records_folder()
            folder.mkdir(parents=True, exist_ok=True)
            record = folder / f"{server.server_process.pid}.json"
            record.write_text(
                json.dumps({"pid": server.server_process.pid, "parent": os.getpid(), "port": server.port})
            )
        yield
    finally:
        _drain_prefect_workers()
        server.stop()
        if record is not None:
            record.unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
