"""What machine a benchmark ran on, for its JSON: timings and int8 speed-ups depend on the CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# The CPU features that decide whether ONNX Runtime's int8 matmuls are fast (VNNI) or not.
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine_info() -> dict[str, Any]:
    """CPU count, CPU model and its int8-relevant features (from /proc/cpuinfo on Linux), Python."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or "unknown"
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "cpu_features": [f for f in FEATURES if f in flags],
        "python": platform.python_version(),
    }
