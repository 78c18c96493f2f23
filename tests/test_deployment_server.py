"""Integration: a real Prefect server (SQLite) on 127.0.0.1, the catalog-refresh deployment from
prefect.yaml with its schedule, a process worker, one run on the shipped catalog sample."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.core.registry import Registry
from tasks.serving.search import Searcher

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(env, *args, timeout=300):
    result = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError("Prefect server did not start:\n" + (tmp_path / "server.log").read_text())
        time.sleep(1)
    yield env
    _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """Stop a server or worker and everything it started. SIGTERM first; a process worker can
    take longer than a minute to wind down after a run (a CI run once timed out here after the
    watched run had completed), and that shutdown is not what these tests check, so the group
    is killed if it is still there after 60 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_catalog_refresh_deployment_runs_on_a_real_server(server, tmp_path, tiny_bi_encoder):
    env = server
    _prefect(env, "work-pool", "create", "local-process", "--type", "process")
    out = _prefect(env, "--no-prompt", "deploy", "--name", "catalog-refresh")
    assert "catalog-refresh" in out
    inspected = _prefect(env, "deployment", "inspect", "catalog-refresh/catalog-refresh")
    assert "0 2 * * *" in inspected  # the nightly schedule is on the server

    workspace = tmp_path / "ws"
    params = {
        "config": {
            "catalog": str(ROOT / "data" / "fashion-sample" / "styles.csv"),
            "workspace": str(workspace),
            "base_model": str(tiny_bi_encoder),
            "max_seq_length": 32,
            "train": {"max_steps": 2, "batch_size": 8, "max_seq_length": 32},
        }
    }
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "local-process"],
        cwd=ROOT,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run = subprocess.run(
            [
                PREFECT,
                "deployment",
                "run",
                "catalog-refresh/catalog-refresh",
                "--params",
                json.dumps(params),
                "--watch",
                "--watch-interval",
                "3",
                "--watch-timeout",
                "900",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1000,
        )
    finally:
        _stop(worker)
    logs = (tmp_path / "worker.log").read_text()
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), run.stdout + run.stderr + logs

    registry = Registry(workspace)
    serving = registry.current("catalog-text")
    assert serving is not None
    first = registry.card("catalog-text", registry.versions("catalog-text")[0])
    assert first["corpus"].endswith("styles.csv")
    hits = Searcher(workspace, "catalog-text").search("black track pants for men", k=5)
    assert len(hits) == 5 and len({h.doc_id for h in hits}) == 5
    state = json.loads((workspace / "refresh" / "catalog-text" / "state.json").read_text())
    assert len(state["snapshot"]) == 400 and state["runs"] == 1
