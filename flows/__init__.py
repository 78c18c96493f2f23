"""Prefect flows: compose the stages of `tasks` and the training of `finetune`; own no algorithm."""

from tasks import _env  # noqa: F401  (environment defaults before torch/Prefect load)
