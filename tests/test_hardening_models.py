"""The safetensors-only rule holds in every sub-folder of a model: a pickle never reaches torch.load."""

from __future__ import annotations

import json
import shutil

import pytest

from tasks.core.models import ModelNotAvailableError, load_sentence_transformer, resolve_model


@pytest.fixture()
def no_torch_load(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load was called on {args[0] if args else kwargs}")

    monkeypatch.setattr(torch, "load", refuse)


def _with_pickled_dense(tiny_bi_encoder, target):
    """The tiny bi-encoder plus a Dense module saved as pytorch_model.bin and named in modules.json,
    so a loader that accepted the folder would torch.load it."""
    from sentence_transformers.sentence_transformer.modules import Dense

    shutil.copytree(tiny_bi_encoder, target)
    (target / "9_Dense").mkdir()
    Dense(in_features=32, out_features=32).save(str(target / "9_Dense"), safe_serialization=False)
    assert (target / "9_Dense" / "pytorch_model.bin").is_file()
    modules = json.loads((target / "modules.json").read_text())
    modules.append(
        {
            "idx": len(modules),
            "name": str(len(modules)),
            "path": "9_Dense",
            "type": "sentence_transformers.sentence_transformer.modules.Dense",
        }
    )
    (target / "modules.json").write_text(json.dumps(modules))
    return target


def test_a_pickle_in_a_sub_module_is_refused_before_anything_loads(tmp_path, tiny_bi_encoder, no_torch_load):
    folder = _with_pickled_dense(tiny_bi_encoder, tmp_path / "model")
    for call in (resolve_model, load_sentence_transformer):
        with pytest.raises(ModelNotAvailableError) as info:
            call(folder)
        message = str(info.value)
        assert "9_Dense/pytorch_model.bin" in message and "only safetensors weights" in message
        assert "save_pretrained" in message and "\n" not in message


def test_any_pickle_suffix_anywhere_is_refused_also_in_the_registry_side_folders(tmp_path, tiny_bi_encoder):
    for relative in ("onnx/extra.pt", "index/meta.pkl", "1_Pooling/state.pth", "a/b/c.ckpt", "x.pickle"):
        folder = tmp_path / relative.replace("/", "_").replace(".", "_")
        shutil.copytree(tiny_bi_encoder, folder)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
        with pytest.raises(ModelNotAvailableError, match=relative.replace(".", r"\.")):
            resolve_model(folder)


def test_a_sub_folder_linked_from_outside_is_checked_too(tmp_path, tiny_bi_encoder):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    folder = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder, folder)
    (folder / "9_Dense").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelNotAvailableError, match="9_Dense/pytorch_model.bin"):
        resolve_model(folder)


def test_a_pickle_added_after_resolving_is_refused_at_load(tmp_path, tiny_bi_encoder, no_torch_load):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bi_encoder, folder)
    resolved = resolve_model(folder)
    _with_pickled_dense(tiny_bi_encoder, tmp_path / "staged")
    shutil.move(tmp_path / "staged" / "9_Dense", folder / "9_Dense")
    shutil.copyfile(tmp_path / "staged" / "modules.json", folder / "modules.json")
    with pytest.raises(ModelNotAvailableError, match="9_Dense/pytorch_model.bin"):
        load_sentence_transformer(resolved)


def test_a_hub_snapshot_with_a_pickled_module_is_refused(
    monkeypatch, tmp_path, tiny_bi_encoder, no_torch_load
):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-st" / "snapshots" / ("b" * 40)
    snapshot.parent.mkdir(parents=True)
    _with_pickled_dense(tiny_bi_encoder, snapshot)
    (cache / "models--acme--tiny-st" / "refs").mkdir()
    (cache / "models--acme--tiny-st" / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotAvailableError, match="9_Dense/pytorch_model.bin"):
        resolve_model("acme/tiny-st")
    with pytest.raises(ModelNotAvailableError, match="9_Dense/pytorch_model.bin"):
        load_sentence_transformer("acme/tiny-st")
