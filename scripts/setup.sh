#!/usr/bin/env bash
# Create .venv and install domain-adapt with the versions pinned in constraints.txt.
# Safe to run again: it does nothing when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$candidate"
            return 0
        fi
    done
    echo "domain-adapt needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    py=$(pick_python)
    echo "setup: creating .venv with $py"
    "$py" -m venv .venv
fi

stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" = "$stamp" ]; then
    exit 0
fi

echo "setup: installing dependencies into .venv (first run takes a few minutes)"
# torch first and alone: exactly the CPU build, so no resolver step can swap in a CUDA wheel.
# (The filter drops pip's warnings about this machine's unused local index folders.)
quiet_pip() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }
quiet_pip "torch==2.13.0"
quiet_pip -c constraints.txt -e '.[dev]'
.venv/bin/python -c 'import torch, sentence_transformers, prefect, faiss, flows.cli' >/dev/null
echo "$stamp" > .venv/.installed
echo "setup: done"
