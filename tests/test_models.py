import shutil
import time

import pytest

from tasks.core.models import ModelNotAvailableError, load_sentence_transformer, resolve_model


def test_local_directory_resolves_and_loads(tiny_bi_encoder):
    resolved = resolve_model(str(tiny_bi_encoder))
    assert resolved.source == "local" and resolved.path == tiny_bi_encoder.resolve()
    model = load_sentence_transformer(resolved)
    assert model.encode(["a short text"]).shape == (1, 32)


def test_bundled_minilm_resolves_to_the_package_weights():
    resolved = resolve_model("all-MiniLM-L6-v2")
    assert resolved.source == "bundled"
    assert (resolved.path / "model.safetensors").is_file()
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").path == resolved.path


def test_fingerprint_is_stable_and_follows_the_weights(tiny_bi_encoder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bi_encoder, copy)
    assert resolve_model(str(copy)).fingerprint == resolve_model(str(tiny_bi_encoder)).fingerprint
    # what the registry and search add next to a model (card, index, ONNX export) is not the model
    (copy / "card.json").write_text("{}")
    (copy / "index").mkdir()
    (copy / "index" / "index.faiss").write_bytes(b"x")
    assert resolve_model(str(copy)).fingerprint == resolve_model(str(tiny_bi_encoder)).fingerprint
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert resolve_model(str(copy)).fingerprint != resolve_model(str(tiny_bi_encoder)).fingerprint


def test_hub_id_fails_fast_offline_with_how_to_supply_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.time()
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model("cross-encoder/ms-marco-MiniLM-L-6-v2")
    assert time.time() - start < 5
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "local-dir" in message and "path" in message


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    start = time.time()
    with pytest.raises(ModelNotAvailableError, match="unreachable"):
        resolve_model("BeIR/query-gen-msmarco-t5-base-v1")
    assert time.time() - start < 8


def test_hub_id_in_the_local_hub_cache_resolves_offline(monkeypatch, tmp_path, tiny_cross_encoder):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-ce" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_cross_encoder, snapshot)
    (cache / "models--acme--tiny-ce" / "refs").mkdir()
    (cache / "models--acme--tiny-ce" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    resolved = resolve_model("acme/tiny-ce")
    assert resolved.source == "hub" and resolved.path == snapshot


def test_pickle_only_weights_are_refused(tmp_path, tiny_cross_encoder):
    unsafe = tmp_path / "unsafe"
    shutil.copytree(tiny_cross_encoder, unsafe)
    (unsafe / "model.safetensors").rename(unsafe / "pytorch_model.bin")
    with pytest.raises(ModelNotAvailableError, match="safetensors"):
        resolve_model(str(unsafe))


def test_missing_or_bad_local_paths_are_explained(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="is a file"):
        resolve_model(str(tmp_path / "file.bin"))
