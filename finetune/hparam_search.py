"""Hyper-parameter search over supervised fine-tuning, with Optuna.

Searched: learning rate, batch size, epochs, warm-up, the loss, and the base model itself. Each
trial trains on the training rows and is scored on a validation set (never the final evaluation
set) by one metric; the first trial of a new study is the default settings, so the best trial is
never worse than the defaults on that metric.

The study lives in SQLite under the workspace (``<dir>/study.db``): a crashed or interrupted
search, run again with the same settings, keeps its finished trials, re-runs the trial that was
cut off, and goes on until ``n_trials`` trials have finished. Trials whose intermediate
evaluations fall below the median of earlier trials at the same point are pruned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune.supervised import LOSSES, TrainSettings, make_evaluator, metric_key, train_supervised
from tasks.labelled.eval_set import EvalSet
from tasks.labelled.readers import LabelledData

log = logging.getLogger(__name__)

PARAMS = ("model", "loss", "learning_rate", "batch_size", "epochs", "warmup_ratio", "hard_negatives")


class SearchSettings(BaseModel):
    """What the search explores and how: the single source of these defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    search: int = Field(
        0,
        ge=0,
        le=1000,
        description="hyper-parameter search with this many trials (Optuna); 0: no "
        "search, train once with the settings given",
    )
    search_models: list[str] = Field(
        default_factory=list,
        description="base models the search chooses among (local dirs, bundled names or hub "
        "ids); none: only --model",
    )
    search_loss: list[str] = Field(
        default_factory=lambda: ["mnrl", "online-contrastive", "batch-hard-triplet", "mnrl+contrastive"],
        description=f"losses the search chooses among ({', '.join(LOSSES)})",
    )
    search_learning_rate: list[float] = Field(
        default_factory=lambda: [1e-5, 1e-4], description="learning-rate range searched (low high, log scale)"
    )
    search_batch_sizes: list[int] = Field(
        default_factory=lambda: [16, 32, 64], description="batch sizes the search chooses among"
    )
    search_epochs: list[int] = Field(
        default_factory=lambda: [1, 2], description="epoch counts the search chooses among"
    )
    search_warmup: list[float] = Field(
        default_factory=lambda: [0.0, 0.2], description="warm-up share range searched (low high)"
    )
    search_hard_negatives: list[int] = Field(
        default_factory=lambda: [0],
        description="mined hard negatives per row the search chooses among (mnrl losses; e.g. 0 1); "
        "default: none mined",
    )
    search_validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of the training rows held out (no shared text) to score trials on"
    )
    search_evaluations: int = Field(
        3, ge=1, le=20, description="evaluations per trial; the earlier ones can prune it"
    )
    search_prune: bool = Field(True, description="stop trials that fall below the median of earlier trials")
    search_refit: bool = Field(
        True,
        description="train the best trial's settings again on all training rows "
        "(trials leave the validation rows out)",
    )

    @model_validator(mode="after")
    def _valid_space(self) -> SearchSettings:
        self.check()
        return self

    def check(self) -> None:
        for name in ("search_learning_rate", "search_warmup"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"{name} must be two numbers, low then high")
        unknown = sorted(set(self.search_loss) - set(LOSSES))
        if unknown or not self.search_loss:
            raise ValueError(f"search_loss: unknown loss(es) {unknown}; choose from {', '.join(LOSSES)}")
        if any(b < 4 or b % 2 for b in self.search_batch_sizes) or not self.search_batch_sizes:
            raise ValueError("search_batch_sizes must be even numbers of at least 4")
        if not self.search_hard_negatives or not all(0 <= n <= 10 for n in self.search_hard_negatives):
            raise ValueError("search_hard_negatives must be whole numbers from 0 to 10")
        if not self.search_epochs or min(self.search_epochs) < 1:
            raise ValueError("search_epochs must be whole numbers of at least 1")


@dataclass
class SearchResult:
    """The finished study: its trials and the best one."""

    study_name: str
    storage: str
    metric: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    best_model_dir: str
    default_trial: int | None
    default_value: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False
    params: list[str] = field(default_factory=lambda: list(PARAMS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def card(self) -> dict[str, Any]:
        """What a model card records of the search that chose its settings."""
        return {"study": self.study_name, "best_trial": self.best_trial, "best_params": self.best_params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        return cls(**data)


def study_key(
    train: LabelledData, validation: EvalSet, base: TrainSettings, space: SearchSettings, metric: str
) -> str:
    """A study is resumed only by a search over the same data, space, base settings and metric."""
    from tasks.core.store import stage_key

    config = {
        "base": base.model_dump(mode="json"),
        "space": space.model_dump(mode="json", exclude={"search", "search_refit"}),
        "metric": metric,
    }
    return stage_key("search", config, inputs=[train.key, validation.retrieval.corpus.key])


def suggest(trial: Any, base: TrainSettings, space: SearchSettings) -> TrainSettings:
    """The settings of one trial: the base settings with the searched ones drawn by Optuna."""
    models = space.search_models or [base.model]
    low_lr, high_lr = space.search_learning_rate
    low_warmup, high_warmup = space.search_warmup
    values = {
        "model": trial.suggest_categorical("model", list(models)),
        "loss": trial.suggest_categorical("loss", list(space.search_loss)),
        "learning_rate": trial.suggest_float("learning_rate", low_lr, high_lr, log=True),
        "batch_size": trial.suggest_categorical("batch_size", list(space.search_batch_sizes)),
        "epochs": trial.suggest_categorical("epochs", list(space.search_epochs)),
        "warmup_ratio": trial.suggest_float("warmup_ratio", low_warmup, high_warmup),
        "hard_negatives": trial.suggest_categorical("hard_negatives", list(space.search_hard_negatives)),
    }
    return base.model_copy(update=values)


def default_params(base: TrainSettings, space: SearchSettings, kind: str) -> dict[str, Any]:
    """The base settings as trial parameters, where they lie inside the space searched."""
    models = space.search_models or [base.model]
    candidates = {
        "model": base.model if base.model in models else None,
        "loss": base.resolved_loss(kind) if base.resolved_loss(kind) in space.search_loss else None,
        "learning_rate": base.learning_rate
        if space.search_learning_rate[0] <= base.learning_rate <= space.search_learning_rate[1]
        else None,
        "batch_size": base.batch_size if base.batch_size in space.search_batch_sizes else None,
        "epochs": int(base.epochs) if base.epochs in space.search_epochs else None,
        "warmup_ratio": base.warmup_ratio
        if space.search_warmup[0] <= base.warmup_ratio <= space.search_warmup[1]
        else None,
        "hard_negatives": base.hard_negatives if base.hard_negatives in space.search_hard_negatives else None,
    }
    return {k: v for k, v in candidates.items() if v is not None}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """One search process per study at a time: the lock is what lets a starting search call any
    trial still marked running a leftover of a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another search is running on this study ({path.parent}); wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover_crashed_trials(study: Any) -> int:
    """Queue once more the parameters of trials a crash cut off.

    A trial still RUNNING was left by a killed process (we hold the study's lock, so nobody runs
    it): it is marked failed. A FAILED trial was stopped by an error or an interrupt. Each is
    queued again once, so the search finishes the trials it had started; finished trials stay.
    (Optuna's heartbeat + RetryFailedTrialCallback only acts after a grace period, and not on
    trials that failed with an exception.)
    """
    from optuna.trial import TrialState

    storage = study._storage  # noqa: SLF001 - the storage API needs the study's own storage
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = 0
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
        elif trial.state != TrialState.FAIL:
            continue
        if trial.number in retried or trial.user_attrs.get("retry_of") is not None:
            continue  # retried once already
        study.enqueue_trial(
            trial.params,
            user_attrs={"retry_of": trial.number, "default": trial.user_attrs.get("default", False)},
            skip_if_exists=False,
        )
        log.warning("trial %d was cut off (%s); it runs again", trial.number, trial.state.name.lower())
        queued += 1
    return queued


def remove_stale_staging(study_dir: Path, live_trials: Sequence[int] = ()) -> int:
    """Remove the ``.trial-NNNN.*`` staging folders a crash left that no live trial owns; returns how many."""
    stale = [
        p
        for p in study_dir.glob(".trial-*.*")
        if p.is_dir() and (owner := p.name[7:].split(".")[0]).isdigit() and int(owner) not in live_trials
    ]
    for folder in stale:
        shutil.rmtree(folder)
    log.info("removed %d staging folder(s) of trials a crash cut off, in %s", len(stale), study_dir)
    return len(stale)


def run_search(
    train: LabelledData,
    validation: EvalSet,
    *,
    base: TrainSettings,
    space: SearchSettings,
    workdir: str | Path,
    metric: str = "nDCG@10",
    keep_models: bool = False,
    show_progress: bool = True,
    callbacks: Sequence[Any] = (),
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    pruner: Any = None,
) -> SearchResult:
    """Run (or resume) a study of ``space.search`` trials; returns the best trial and all trials.

    ``workdir/<study key>/`` holds ``study.db`` and one model directory per kept trial (the best so
    far; all with ``keep_models``). ``callbacks`` go to every trial's trainer; ``on_trial`` gets each finished
    trial's row; ``pruner`` replaces the median pruner of ``space.search_prune``.
    """
    import optuna

    space.check()
    defaults = default_params(base, space, train.kind)
    if len(defaults) < len(PARAMS):
        log.warning(
            "settings %s lie outside the searched space; the first trial draws them",
            sorted(set(PARAMS) - set(defaults)),
        )

    def objective(trial: Any, model_dir: Path) -> float:
        settings = suggest(trial, base, space)
        pruning = _pruning_callback(trial, metric_key(metric))
        evaluator = make_evaluator(validation, metric)
        log.info("trial %d: %s", trial.number, {p: getattr(settings, p) for p in PARAMS})
        result = train_supervised(
            train,
            settings,
            model_dir,
            evaluator=evaluator,
            evaluations=space.search_evaluations,
            callbacks=[pruning, *callbacks],
            show_progress=show_progress,
        )
        trial.set_user_attr("seconds", result.seconds)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("resolved_loss", result.loss)
        if pruning.pruned:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise optuna.TrialPruned(f"pruned after evaluation {pruning.reported}")
        report = evaluator.last_report
        trial.set_user_attr("metrics", report.metrics)
        return float(report.metric(metric))

    return run_study(
        study_key(train, validation, base, space, metric),
        workdir,
        objective,
        trials=space.search,
        seed=base.seed,
        metric=metric,
        defaults=defaults,
        params=PARAMS,
        pruner=pruner
        or (
            optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
            if space.search_prune
            else optuna.pruners.NopPruner()
        ),
        keep_models=keep_models,
        on_trial=on_trial,
    )


def run_study(
    name: str,
    workdir: str | Path,
    objective: Callable[[Any, Path], float],
    *,
    trials: int,
    seed: int,
    metric: str,
    defaults: dict[str, Any],
    params: Sequence[str],
    pruner: Any = None,
    keep_models: bool = False,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Run (or resume) the Optuna study ``name`` under ``workdir/<name>/`` until ``trials`` trials have
    finished: ``objective(trial, model_dir)`` trains one trial into ``model_dir`` and returns its
    score (higher is better); the first trial of a new study is ``defaults`` (a trial marked
    ``default`` when they name every one of ``params``). One process per study at a time; trials a
    crash cut off run again; only the best trial's model is kept unless ``keep_models``."""
    import optuna
    from optuna.trial import TrialState

    if trials < 1:
        raise ValueError("a search needs at least one trial")
    workdir = Path(workdir) / name
    workdir.mkdir(parents=True, exist_ok=True)
    storage_url = f"sqlite:///{(workdir / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _exclusive(workdir / ".lock"):
        storage = optuna.storages.RDBStorage(storage_url)
        done_before = len(_existing_trials(storage, name))
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            # seeded, and re-seeded past the trials a resumed study already has: the same seed again
            # would draw the parameters of those trials again
            sampler=optuna.samplers.TPESampler(seed=seed + done_before),
            pruner=pruner or optuna.pruners.NopPruner(),
            load_if_exists=True,
        )
        resumed = len(study.trials) > 0
        _recover_crashed_trials(study)
        remove_stale_staging(workdir)  # we hold the study's lock: no trial is live
        if not resumed:
            study.set_user_attr("metric", metric)
            study.enqueue_trial(defaults, user_attrs={"default": len(defaults) == len(params)})
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
        if resumed:
            log.info("study %s resumed: %d of %d trials finished", name, trials - max(remaining, 0), trials)

        def run_trial(trial: Any) -> float:
            model_dir = workdir / f"trial-{trial.number:04d}"
            shutil.rmtree(model_dir, ignore_errors=True)  # a leftover of a crash: never reused
            value = objective(trial, model_dir)
            trial.set_user_attr("model_dir", str(model_dir))
            return value

        def after_trial(study: Any, trial: Any) -> None:
            if not keep_models:
                _keep_only_best(study, workdir)
            if on_trial is not None:
                on_trial(_trial_row(trial, metric, params))

        if remaining > 0:
            study.optimize(run_trial, n_trials=remaining, callbacks=[after_trial], catch=())
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise RuntimeError(f"no trial of study {name} finished (all pruned or failed)")
        best = study.best_trial
        default_trials = [t for t in complete if t.user_attrs.get("default")]
        return SearchResult(
            study_name=name,
            storage=storage_url,
            metric=metric,
            best_trial=best.number,
            best_value=float(best.value),
            best_params=dict(best.params),
            best_model_dir=best.user_attrs["model_dir"],
            default_trial=default_trials[0].number if default_trials else None,
            default_value=float(default_trials[0].value) if default_trials else None,
            trials=[_trial_row(t, metric, params) for t in study.get_trials(deepcopy=False)],
            resumed=resumed,
            params=list(params),
        )


def _existing_trials(storage: Any, name: str) -> list[Any]:
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
    except KeyError:  # no such study yet
        return []


def _keep_only_best(study: Any, workdir: Path) -> None:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = max(complete, key=lambda t: t.value).number
    for trial in complete:
        if trial.number != best:
            shutil.rmtree(workdir / f"trial-{trial.number:04d}", ignore_errors=True)


def _pruning_callback(trial: Any, metric: str):
    """Report each evaluation to Optuna and stop the trial when the pruner says so.

    Steps are evaluation numbers (1, 2, ...), not optimizer steps, so trials with different batch
    sizes or epochs are compared at the same share of their training.
    """
    from transformers import TrainerCallback

    class OptunaPruning(TrainerCallback):
        def __init__(self) -> None:
            self.reported = 0
            self.pruned = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(f"eval_{metric}")
            if value is None or state.global_step >= state.max_steps:
                return  # the final evaluation is the trial's value, not an intermediate one
            self.reported += 1
            trial.report(float(value), self.reported)
            if trial.should_prune():
                self.pruned = True
                control.should_training_stop = True

    return OptunaPruning()


def _trial_row(trial: Any, metric: str, names: Sequence[str] = PARAMS) -> dict[str, Any]:
    params = dict(trial.params)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": float(trial.value) if trial.state.name == "COMPLETE" else None,
        "intermediate": {str(k): float(v) for k, v in sorted(trial.intermediate_values.items())},
        "default": bool(trial.user_attrs.get("default")),
        "retry_of": trial.user_attrs.get("retry_of"),
        "seconds": trial.user_attrs.get("seconds"),
        "metrics": trial.user_attrs.get("metrics", {}),
        **{p: params.get(p) for p in names},
    }


# -------------------------------------------------------------------------------------- reports


def save_result(result: SearchResult, path: str | Path) -> Path:
    from tasks.core.store import write_json_atomic

    write_json_atomic(Path(path), result.to_dict())
    return Path(path)


def load_result(path: str | Path) -> SearchResult:
    return SearchResult.from_dict(json.loads(Path(path).read_text()))
