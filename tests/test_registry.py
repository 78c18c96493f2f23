import multiprocessing
import time

import pytest

from tasks.core.registry import Registry, RegistryError, RegistryLockedError


def model_dir(tmp_path, name, payload="w"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_text(payload)
    return folder


def test_register_versions_and_cards(tmp_path):
    registry = Registry(tmp_path / "ws")
    v1 = registry.register(
        "retriever",
        model_dir(tmp_path, "a"),
        {"base_model": "all-MiniLM-L6-v2", "metrics_after": {"nDCG@10": 0.7}},
    )
    v2 = registry.register("retriever", model_dir(tmp_path, "b"), {"base_model": "all-MiniLM-L6-v2"})
    assert (v1, v2) == ("v0001", "v0002") and registry.versions("retriever") == ["v0001", "v0002"]
    card = registry.card("retriever", v1)
    assert card["version"] == "v0001" and card["metrics_after"] == {"nDCG@10": 0.7}
    assert (registry.path("retriever", v2) / "model.safetensors").read_text() == "w"
    assert registry.current("retriever") is None
    with pytest.raises(RegistryError, match="no current version"):
        registry.path("retriever")
    assert registry.names() == ["retriever"]
    assert not list((tmp_path / "ws" / "models" / "retriever").glob(".*tmp*"))


def test_gate_promotes_only_a_better_model_and_says_why(tmp_path):
    registry = Registry(tmp_path)
    v1 = registry.register("m", model_dir(tmp_path, "a"), {})
    first = registry.promote_if_better("m", v1, new_score=0.70, current_score=0.645, metric="nDCG@10")
    assert first.promoted and registry.current("m") == v1 and "0.6450 to 0.7000" in first.reason
    v2 = registry.register("m", model_dir(tmp_path, "b"), {})
    worse = registry.promote_if_better("m", v2, new_score=0.69, current_score=0.70, metric="nDCG@10")
    assert not worse.promoted and registry.current("m") == v1
    assert "does not beat 0.7000 of v0001" in worse.reason
    equal = registry.promote_if_better("m", v2, new_score=0.70, current_score=0.70, metric="nDCG@10")
    assert not equal.promoted
    assert [e["event"] for e in registry.history("m")] == ["promoted", "rejected", "rejected"]


def test_rollback_restores_the_previous_version(tmp_path):
    registry = Registry(tmp_path)
    v1 = registry.register("m", model_dir(tmp_path, "a"), {})
    v2 = registry.register("m", model_dir(tmp_path, "b"), {})
    registry.promote("m", v1)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback("m")
    registry.promote_if_better("m", v2, new_score=1.0, current_score=0.5, metric="x")
    assert registry.current("m") == v2
    back = registry.rollback("m")
    assert back.version == v1 and registry.current("m") == v1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback("m")


def _hold_lock(workspace, seconds, ready):
    registry = Registry(workspace)
    with registry.lock("m"):
        ready.set()
        time.sleep(seconds)


def _register_one(workspace, source, results):
    try:
        results.put(Registry(workspace, lock_timeout=30).register("m", source, {}))
    except Exception as exc:  # noqa: BLE001
        results.put(repr(exc))


@pytest.mark.slow
def test_lock_holds_across_processes(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, 2.0, ready))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(RegistryLockedError, match="locked by another run"):
        Registry(tmp_path, lock_timeout=0.5).register("m", model_dir(tmp_path, "a"), {})
    holder.join()
    # two concurrent registrations both succeed, with distinct versions
    results = context.Queue()
    source = model_dir(tmp_path, "b")
    workers = [context.Process(target=_register_one, args=(tmp_path, source, results)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(results.get() for _ in workers) == ["v0001", "v0002"]


def test_bad_names_and_versions(tmp_path):
    registry = Registry(tmp_path)
    with pytest.raises(RegistryError, match="must be letters"):
        registry.register("../evil", model_dir(tmp_path, "a"), {})
    registry.register("m", model_dir(tmp_path, "b"), {})
    with pytest.raises(RegistryError, match="no version 'v0009'"):
        registry.promote("m", "v0009")
