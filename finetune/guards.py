"""Guards every training loop shares: a loss that turns NaN or infinite stops the run with a clear error.

A diverged model is never saved as finished, so no flow registers it. For sentence-transformers /
Hugging Face trainers :class:`DivergenceCallback` checks every logged loss (the trainer has no such
stop of its own); hand-written loops call :func:`check_loss` each step. The trainers' time budget
(:class:`TimeBudget`) and step progress (:class:`StepProgress`) callbacks live here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from finetune.distributed import agreed


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def check_loss(loss: float, step: int) -> None:
    """Raise :class:`TrainingDivergedError` when ``loss`` is not a finite number."""
    if not math.isfinite(float(loss)):
        raise TrainingDivergedError(
            f"training stopped: the loss became {loss} at step {step} (the model diverged); nothing was "
            "registered. Lower the learning rate or check the training data"
        )


def divergence_callback() -> Any:
    """A transformers ``TrainerCallback`` that stops training when a logged loss is not finite."""
    from transformers import TrainerCallback

    class DivergenceCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "train_loss"):
                if logs and key in logs:
                    check_loss(logs[key], state.global_step)

    return DivergenceCallback()


def quiet_trainer_logs(trainer: Any) -> None:
    """Keep a Hugging Face trainer's log dicts off stdout: the printer goes, the progress bar (on
    stderr) stays but no longer writes each log line under it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    trainer.remove_callback(PrinterCallback)
    if any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly())


def no_model_card_widgets(model: Any) -> None:
    """Checkpoints write a model card; its widget examples cost a progress bar and encoding time."""
    card = getattr(model, "model_card_data", None)
    if card is not None and hasattr(card, "generate_widget_examples"):
        card.generate_widget_examples = False
        # the trainer computes them at its start whenever the card has none yet: give it one
        if hasattr(card, "widget") and not card.widget:
            card.widget = [{"text": "widget examples are not computed by domain-adapt"}]


class TimeBudget:
    """Trainer callback: stop after a wall-clock budget (the model so far is kept)."""

    def __init__(self, minutes: float | None):
        self.deadline = time.time() + minutes * 60 if minutes else None
        self.hit = False

    def make(self):
        from transformers import TrainerCallback

        budget = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                # on several processes rank 0's clock decides, so they all stop at the same step
                if budget.deadline and agreed(float(time.time() > budget.deadline)):
                    budget.hit = True
                    control.should_training_stop = True
                    control.should_save = True
                return control

        return Callback()


class StepProgress:
    """Trainer callback: report (step, total steps) to the caller."""

    def __init__(self, report: Callable[[int, int], None] | None):
        self.report = report

    def make(self):
        from transformers import TrainerCallback

        report = self.report

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if report:
                    report(state.global_step, state.max_steps)
                return control

        return Callback()
