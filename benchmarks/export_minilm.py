"""ONNX export of all-MiniLM-L6-v2 (fp32 and int8): parity with PyTorch, size and encode speed.

Writes benchmarks/results/export_minilm.json (`fp32_min_cosine`, `int8_min_cosine`, sizes, texts/s).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import machine_info  # noqa: E402

from tasks import _env  # noqa: F401,E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/export-minilm-benchmark"))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "export_minilm.json")
    args = parser.parse_args()

    from tasks.core.models import resolve_model
    from tasks.core.onnx import export_onnx
    from tasks.core.store import write_json_atomic

    shutil.rmtree(args.output_dir, ignore_errors=True)
    summary = export_onnx(resolve_model("all-MiniLM-L6-v2").path, args.output_dir, int8=True)
    result = {
        "fp32_min_cosine": summary["fp32"]["min_cosine"],
        "int8_min_cosine": summary["int8"]["min_cosine"],
        **{
            k: summary[k]
            for k in ("pytorch", "fp32", "int8", "texts", "max_seq_length", "min_cosine_required")
        },
        "machine": machine_info(),
    }
    write_json_atomic(args.output, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
