"""The temporary Prefect server of an `adapt` command is never left behind: not after SIGTERM, SIGINT,
nor SIGKILL (then the next run stops what is left, and servers never stack up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_beir_subset

pytestmark = pytest.mark.slow
ADAPT = str(Path(sys.executable).parent / "adapt")


def _servers(home: Path) -> list[int]:
    """Pids of temporary Prefect servers started with this PREFECT_HOME."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"prefect.server.api.server:create_app" in cmdline and f"PREFECT_HOME={home}".encode() in environ:
            found.append(int(proc.name))
    return found


def _wait(predicate, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


@pytest.fixture()
def command(tmp_path, scifact_sample, tiny_bi_encoder):
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    folder = write_beir_subset(scifact_sample, tmp_path / "beir", n_queries=5, n_docs=30)
    args = [
        ADAPT,
        "evaluate",
        "--data",
        str(folder),
        "--models",
        str(tiny_bi_encoder),
        "--workspace",
        str(tmp_path / "ws"),
    ]
    return home, env, args


def _start(command):
    home, env, args = command
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait(lambda: _servers(home), 150), "the command never started its temporary server"
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_command_stops_its_server(command, signum):
    home = command[0]
    process = _start(command)
    process.send_signal(signum)
    process.wait(timeout=60)
    assert _wait(lambda: not _servers(home), 15), f"server left running after {signal.Signals(signum).name}"


def test_after_a_kill_the_server_goes_and_the_next_run_leaves_none(command):
    home, env, args = command
    process = _start(command)
    process.kill()
    process.wait(timeout=30)
    assert _wait(lambda: len(_servers(home)) <= 1, 15)
    finished = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert _wait(lambda: not _servers(home), 15), "a server is left after the next run"
