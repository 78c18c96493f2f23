"""Which int8 export, if any, encodes corpus passages 2x faster than plain encode at parity >= 0.99.

The issue's encode target asks for both at once; `adapt_corpora.py` measures the flow's own
backends (ONNX fp32 and the flow's int8 export). This script measures the other quantisation
settings onnxruntime offers on the same texts (per corpus: 256 seeded passages at 256 tokens, the
sample `adapt_corpora.py` uses), each against plain ``SentenceTransformer.encode``:

* ``fp32``: the flow's ONNX export, unquantised.
* ``int8 (the flow's)``: dynamic int8 MatMuls, per-channel weights, 7-bit range (``reduce_range``).
* ``int8 full range``: the same with 8-bit weights (``reduce_range`` is for CPUs without VNNI).
* ``int8 full range, FFN output fp32``: the same, with each layer's feed-forward output MatMul
  (the one whose inputs, after GELU, have the widest range) left in fp32.
* ``int8 after ORT's BERT optimizer``: onnxruntime.transformers' fusions, then full-range int8.

Speeds are wall time of one pass after a warm-up; one run per corpus, alone on the machine.
Writes benchmarks/results/int8_variants.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def variants(folder: Path) -> dict[str, Path]:
    """Write each variant's ONNX file into ``folder`` (which holds the fp32 export)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fp32 = folder / "model.onnx"
    matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "MatMul"]
    ffn_out = [n for n in matmuls if "/output/dense/" in n and "/attention/" not in n]
    common = {"weight_type": QuantType.QInt8, "per_channel": True, "op_types_to_quantize": ["MatMul"]}
    files = {"fp32": fp32}
    settings = {
        "int8 (the flow's)": {"reduce_range": True},
        "int8 full range": {"reduce_range": False},
        "int8 full range, FFN output fp32": {"reduce_range": False, "nodes_to_exclude": ffn_out},
    }
    for name, extra in settings.items():
        files[name] = folder / f"{name.replace(' ', '-').replace(',', '').replace(chr(39), '')}.onnx"
        quantize_dynamic(str(fp32), str(files[name]), **common, **extra)
    fused = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=384)
    fused.save_model_to_file(str(folder / "fused.onnx"))
    files["int8 after ORT's BERT optimizer"] = folder / "fused-int8.onnx"
    # the fused graph has contrib ops shape inference cannot type: say their outputs are float
    quantize_dynamic(
        str(folder / "fused.onnx"),
        str(files["int8 after ORT's BERT optimizer"]),
        **common,
        reduce_range=False,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return files


def measure(corpus: Path, files: dict[str, Path], export: Path, n: int, length: int) -> dict[str, Any]:
    import numpy as np
    from adapt_corpora import passage_sample, plain_encode, timed

    from tasks.core.onnx import OnnxEncoder

    texts = passage_sample(corpus, n)  # the texts of adapt_corpora.py's encode check
    reference, plain = timed(plain_encode(length), texts)
    out: dict[str, Any] = {
        "texts": len(texts),
        "max_seq_length": length,
        "plain_texts_per_second": round(plain, 2),
    }
    for name, file in files.items():
        encoder = OnnxEncoder(export, file.name, max_length=length)

        def encode(batch, encoder=encoder):
            vectors = encoder.encode(list(batch), batch_size=32)
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

        vectors, speed = timed(encode, texts)
        cosines = np.einsum("ij,ij->i", reference, vectors)
        out[name] = {
            "texts_per_second": round(speed, 2),
            "speedup": round(speed / plain, 2),
            "min_cosine": round(float(cosines.min()), 5),
            "mean_cosine": round(float(cosines.mean()), 5),
            "meets_target": bool(speed / plain >= 2.0 and cosines.min() >= 0.99),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder of BEIR-layout corpora")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/int8-variants"))
    parser.add_argument("--texts", type=int, default=256, help="passages per corpus")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "int8_variants.json")
    args = parser.parse_args()

    from adapt_corpora import beir_folders
    from rich.console import Console
    from rich.table import Table

    from tasks.core.defaults import BASE_MODEL
    from tasks.core.models import resolve_model
    from tasks.core.onnx import export_onnx
    from tasks.core.store import write_json_atomic

    shutil.rmtree(args.workspace, ignore_errors=True)
    export = args.workspace / "export"
    export_onnx(resolve_model(BASE_MODEL).path, export, int8=False)
    files = variants(export)
    results = {
        folder.name: measure(folder, files, export, args.texts, args.max_seq_length)
        for folder in beir_folders(args.data)
    }
    table = Table(title="int8 variants against plain encode (speed-up, min cosine)")
    table.add_column("variant")
    for name in results:
        table.add_column(name, justify="right")
    for variant in files:
        table.add_row(
            variant,
            *(f"{r[variant]['speedup']:.2f}x  {r[variant]['min_cosine']:.4f}" for r in results.values()),
        )
    Console().print(table)
    write_json_atomic(args.output, {"corpora": results, "machine": machine_info()})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
