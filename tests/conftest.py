"""Shared fixtures: tiny models (session scope), the shipped samples, one Prefect test harness."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch or Prefect is imported anywhere: the project's environment defaults, and no hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest  # noqa: E402

from tasks import _env  # noqa: E402,F401

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


@pytest.fixture(scope="session")
def scifact_sample() -> Path:
    return DATA / "scifact-sample"


@pytest.fixture(scope="session")
def fashion_sample() -> Path:
    return DATA / "fashion-sample"


@pytest.fixture(scope="session")
def quora_sample() -> Path:
    return DATA / "quora-sample"


@pytest.fixture(scope="session")
def tiny_bi_encoder(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_bi_encoder(tmp_path_factory.mktemp("models") / "tiny-bi-encoder")


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-cross-encoder")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return tiny_models.build_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test server (SQLite in a temp dir) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
