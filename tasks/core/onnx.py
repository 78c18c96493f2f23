"""ONNX Runtime for sentence-transformers models: export (optionally int8) with a parity and speed
check, and a fast encoder for the passes that need no gradients.

Why by hand: sentence-transformers' ONNX backend needs optimum-onnx, whose releases require
transformers < 5, and this project runs transformers 5. So the model is exported with
``torch.onnx.export`` (the whole sentence-transformers pipeline: transformer, pooling and
normalisation, as one graph), quantised with onnxruntime's own ``quantize_dynamic``, and run with
onnxruntime. What is written by hand is only the wrapper that gives the pipeline tensor inputs.

Output folder: ``model.onnx`` (and ``model-int8.onnx``), the tokenizer files, ``export.json``
(parity: cosine of each variant's embeddings with PyTorch's on sample texts; sizes; encode speed).

:func:`fast_encode` gives an ``encode(texts)`` for :class:`tasks.core.embeddings.EmbeddingCache`:
the model exported once per workspace (and checked for parity), texts batched by length so a batch
pads to its own longest text.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.store import write_json_atomic

SAMPLE_TEXTS = (
    "navy blue men shirt",
    "Cells of the immune system respond to infection within hours.",
    "What is the best way to learn a new language as an adult?",
    "Women black leather handbag with a gold chain strap",
    "Aspirin lowers the risk of a second heart attack in patients with coronary disease.",
    "how do I reset my router password",
    "Red running shoes for kids, size 3",
    "The protein folds into a stable structure only at low temperature.",
)


class _Pipeline:
    """torch module: (input_ids, attention_mask) -> sentence embedding, through the whole ST pipeline."""

    def __new__(cls, model: Any):
        import torch

        class Pipeline(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                features = {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "token_type_ids": torch.zeros_like(input_ids),
                }
                return self.inner(features)["sentence_embedding"]

        return Pipeline(model)


class OnnxEncoder:
    """Encode texts with an exported model (onnxruntime on CPU)."""

    def __init__(self, folder: str | Path, file: str = "model.onnx", max_length: int | None = None):
        import onnxruntime
        from transformers import AutoTokenizer

        folder = Path(folder)
        meta = json.loads((folder / "export.json").read_text()) if (folder / "export.json").is_file() else {}
        self.max_length = max_length or meta.get("max_seq_length", 256)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        options = onnxruntime.SessionOptions()
        self.session = onnxruntime.InferenceSession(
            str(folder / file), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embeddings in the order of ``texts``; batches are formed longest first, so each pads only
        to texts of about its own length (what sentence-transformers' encode does too)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        lengths = [
            len(ids)
            for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        ]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        for start in range(0, len(texts), batch_size):
            chosen = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in chosen],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="np",
            )
            vectors = self.session.run(
                None,
                {
                    "input_ids": batch["input_ids"].astype(np.int64),
                    "attention_mask": batch["attention_mask"].astype(np.int64),
                },
            )[0]
            for i, vector in zip(chosen, vectors, strict=True):
                out[i] = vector
        return np.stack(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a, b)


def _speed(encode, texts: Sequence[str], repeats: int = 3) -> float:
    encode(texts[:2])  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        encode(texts)
    return round(repeats * len(texts) / (time.perf_counter() - start), 1)


def export_onnx(
    model_dir: str | Path,
    output: str | Path,
    *,
    int8: bool = False,
    texts: Sequence[str] = SAMPLE_TEXTS,
    min_cosine: float = 0.99,
) -> dict[str, Any]:
    """Export, check parity (cosine >= min_cosine on ``texts``) and measure; returns the summary."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tasks.core.models import load_sentence_transformer

    model_dir, output = Path(model_dir), Path(output)
    model = load_sentence_transformer(str(model_dir))
    model.eval()
    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tokenizer = model.tokenizer
    tokenizer.save_pretrained(staging)
    sample = tokenizer(list(texts[:2]), padding=True, return_tensors="pt")
    # the tracer warns about Python control flow in the model's code; parity is checked below instead
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index")
        torch.onnx.export(
            _Pipeline(model),
            (sample["input_ids"], sample["attention_mask"]),
            str(staging / "model.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    files = {"fp32": "model.onnx"}
    if int8:
        # per-channel int8 weights of the MatMuls with reduced range: cosine 0.993 with PyTorch on
        # all-MiniLM-L6-v2, where per-tensor int8 gives 0.96
        quantize_dynamic(
            str(staging / "model.onnx"),
            str(staging / "model-int8.onnx"),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=True,
            op_types_to_quantize=["MatMul"],
        )
        files["int8"] = "model-int8.onnx"
    write_json_atomic(staging / "export.json", {"max_seq_length": model.max_seq_length})

    reference = model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False)
    summary: dict[str, Any] = {
        "source": str(model_dir),
        "output": str(output),
        "max_seq_length": model.max_seq_length,
        "texts": len(texts),
        "min_cosine_required": min_cosine,
        "pytorch": {
            "size_mb": round(sum(p.stat().st_size for p in model_dir.rglob("*.safetensors")) / 1e6, 2),
            "texts_per_second": _speed(lambda t: model.encode(list(t), show_progress_bar=False), texts),
        },
    }
    failures = []
    for variant, file in files.items():
        encoder = OnnxEncoder(staging, file, max_length=model.max_seq_length)
        cosines = _cosines(reference, encoder.encode(texts))
        summary[variant] = {
            "file": file,
            "size_mb": round((staging / file).stat().st_size / 1e6, 2),
            "min_cosine": round(float(cosines.min()), 5),
            "mean_cosine": round(float(cosines.mean()), 5),
            "texts_per_second": _speed(encoder.encode, texts),
        }
        if cosines.min() < min_cosine:
            failures.append(f"{variant}: min cosine {cosines.min():.4f} < {min_cosine}")
    summary["parity_ok"] = not failures
    write_json_atomic(staging / "export.json", summary)
    if failures:
        raise ValueError(
            "ONNX export does not match the PyTorch model: "
            + "; ".join(failures)
            + f" (files kept in {staging} for inspection)"
        )
    shutil.rmtree(output, ignore_errors=True)
    staging.rename(output)
    return summary


ENCODE_BACKENDS = ("pytorch", "onnx", "onnx-int8")


def fast_encode(
    model_dir: str | Path, fingerprint: str, workspace: str | Path, *, backend: str, max_seq_length: int
):
    """``encode(texts) -> unit rows`` through ONNX Runtime (``backend`` onnx or onnx-int8), exported
    once into ``<workspace>/cache/onnx/<fingerprint>/``; None when the backend is pytorch. An export
    whose parity check fails raises (nothing is cached), so a model ONNX cannot express is refused."""
    if backend == "pytorch":
        return None
    if backend not in ENCODE_BACKENDS:
        raise ValueError(f"encode backend must be one of {', '.join(ENCODE_BACKENDS)}, not {backend!r}")
    folder = Path(workspace) / "cache" / "onnx" / fingerprint
    file = "model-int8.onnx" if backend == "onnx-int8" else "model.onnx"
    if not (folder / file).is_file():
        export_onnx(model_dir, folder, int8=True)
    encoder = OnnxEncoder(folder, file, max_length=max_seq_length)

    def encode(texts: Sequence[str]) -> np.ndarray:
        vectors = encoder.encode(list(texts), batch_size=32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)

    return encode
