"""Training code with no Prefect inside, callable from a notebook."""

from tasks import _env  # noqa: F401  (environment defaults before torch loads)
