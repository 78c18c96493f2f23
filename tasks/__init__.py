"""The stages and what they stand on, one room per concern: ``core`` (infrastructure every stage uses),
``text``, ``catalog``, ``labelled`` and ``serving``. Plain functions with no Prefect inside; their Prefect
tasks are thin wrappers in ``flows/stages.py``."""

from tasks import _env  # noqa: F401  (environment defaults before torch/Prefect load)
