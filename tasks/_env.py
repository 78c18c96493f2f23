"""Process-wide defaults that must be in place before torch or Prefect is imported.

Every package of the project imports this first. Values already set by the user win.
"""

import os

_DEFAULTS = {
    # torch's OpenMP workers spin while idle by default; on 2 cores that made encoding up to 9x slower.
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
    # Prefect must never reach out of the machine: no analytics, no telemetry.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # A fresh Prefect home takes ~18 s to start its ephemeral server here; the default 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

for _name, _value in _DEFAULTS.items():
    os.environ.setdefault(_name, _value)
