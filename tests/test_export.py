"""ONNX export of a registered model: parity with PyTorch, int8, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from tasks.core.onnx import OnnxEncoder, export_onnx
from tasks.core.registry import Registry


@pytest.fixture()
def registered(tmp_path, tiny_bi_encoder):
    registry = Registry(tmp_path / "ws")
    version = registry.register("text-retriever", tiny_bi_encoder, {"base_model": "tiny"})
    registry.promote("text-retriever", version)
    return tmp_path / "ws"


def test_export_matches_pytorch_and_loads_back(tmp_path, tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer

    summary = export_onnx(tiny_bi_encoder, tmp_path / "onnx", int8=True, min_cosine=0.9)
    assert summary["parity_ok"] and summary["fp32"]["min_cosine"] > 0.9999
    assert (
        tmp_path / "onnx" / "model-int8.onnx"
    ).is_file()  # tiny: the fp32 embedding table dominates its size
    assert summary["int8"]["size_mb"] <= summary["fp32"]["size_mb"]
    texts = ["a brand new sentence", "another one, longer than the first one by a few words"]
    got = OnnxEncoder(tmp_path / "onnx").encode(texts)
    want = load_sentence_transformer(str(tiny_bi_encoder)).encode(texts)
    assert np.allclose(got, want, atol=1e-4)  # unseen lengths: the graph's axes are dynamic
    saved = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert saved["pytorch"]["texts_per_second"] > 0 and saved["int8"]["file"] == "model-int8.onnx"


def test_failed_parity_keeps_nothing(tmp_path, tiny_bi_encoder):
    with pytest.raises(ValueError, match="does not match"):
        export_onnx(tiny_bi_encoder, tmp_path / "onnx", min_cosine=1.01)
    assert not (tmp_path / "onnx").exists()


def test_export_command(registered, capsys):
    assert main(["export", "--onnx", "--int8", "--min-cosine", "0.9", "--workspace", str(registered)]) == 0
    out = capsys.readouterr().out
    assert "ONNX fp32" in out and "ONNX int8" in out
    assert (Registry(registered).path("text-retriever") / "onnx" / "model.onnx").is_file()
    assert main(["export", "--onnx", "--model-name", "nope", "--workspace", str(registered)]) == 2
    assert main(["export", "--onnx", "--min-cosine", "2", "--workspace", str(registered)]) == 2


def test_fast_encode_keeps_order_and_matches_pytorch(tmp_path, tiny_bi_encoder):
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.core.onnx import fast_encode

    resolved = resolve_model(str(tiny_bi_encoder))
    assert (
        fast_encode(resolved.path, resolved.fingerprint, tmp_path, backend="pytorch", max_seq_length=32)
        is None
    )
    encode = fast_encode(resolved.path, resolved.fingerprint, tmp_path, backend="onnx", max_seq_length=32)
    texts = ["short", "a much longer text with many more words than the first one has", "mid length text"]
    got = encode(texts)  # batched longest first, returned in the order given
    model = load_sentence_transformer(str(tiny_bi_encoder))
    model.max_seq_length = 32
    want = model.encode(texts, normalize_embeddings=True)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert np.allclose(got, want, atol=1e-4)
    assert (tmp_path / "cache" / "onnx" / resolved.fingerprint / "model-int8.onnx").is_file()
    int8 = fast_encode(resolved.path, resolved.fingerprint, tmp_path, backend="onnx-int8", max_seq_length=32)
    assert np.einsum("ij,ij->i", int8(texts), want).min() > 0.9
    with pytest.raises(ValueError, match="encode backend"):
        fast_encode(resolved.path, resolved.fingerprint, tmp_path, backend="tpu", max_seq_length=32)
