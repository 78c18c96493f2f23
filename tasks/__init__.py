"""Pipeline stages: one module per stage, each a plain function plus a thin Prefect task."""

from tasks import _env  # noqa: F401  (environment defaults before torch/Prefect load)
