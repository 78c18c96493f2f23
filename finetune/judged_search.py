"""Hyper-parameter search for judged queries over a corpus, with Optuna.

Searched: the weight of the contrastive term on judged documents against the teacher's KL (the loss
mix), the share of pseudo-labels (generated queries per judged one; only when they are used) and the
learning rate. Each trial trains the query side (:func:`finetune.listwise.train_listwise`) on the
training queries less a validation split and is scored on that split by the caller's ``score``
(never on the evaluation set). The study's bookkeeping (SQLite under the workspace, resume after a
crash, the defaults as the first trial) is :func:`finetune.hparam_search.run_study`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune.hparam_search import SearchResult, run_study
from finetune.listwise import CandidateLists, JudgedListwiseConfig

JUDGED_PARAMS = ("label_weight", "pseudo_per_judged", "learning_rate")


class JudgedSearchSettings(BaseModel):
    """The space of the judged-queries search: the single source of these defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    search_label_weight: list[float] = Field(
        default_factory=lambda: [0.0, 4.0],
        description="judged queries: range of --listwise-label-weight searched (low high)",
    )
    search_pseudo_per_judged: list[float] = Field(
        default_factory=lambda: [0.0, 8.0],
        description="judged queries with --with-pseudo-labels: range of --listwise-pseudo-per-judged searched",
    )
    search_listwise_learning_rate: list[float] = Field(
        default_factory=lambda: [5e-5, 5e-4],
        description="judged queries: range of --listwise-learning-rate searched (low high, log scale)",
    )

    @model_validator(mode="after")
    def _ranges(self) -> JudgedSearchSettings:
        for name in ("search_label_weight", "search_pseudo_per_judged", "search_listwise_learning_rate"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1] or value[0] < 0:
                raise ValueError(f"{name} must be two numbers of at least 0, low then high")
        if self.search_listwise_learning_rate[0] <= 0:
            raise ValueError("search_listwise_learning_rate must be above 0")
        return self


def _inside(value: float, bounds: Sequence[float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def run_judged_search(
    start_model: str,
    document_vectors: Any,
    base: JudgedListwiseConfig,
    space: JudgedSearchSettings,
    *,
    trials: int,
    lists_for: Callable[[float], CandidateLists],
    score: Callable[[Path], float],
    with_pseudo: bool,
    workdir: str | Path,
    inputs: Sequence[str],
    metric: str = "nDCG@10",
    seed: int = 0,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Run (or resume) a study of ``trials`` trials. ``lists_for(pseudo_per_judged)`` gives a trial's
    training lists, ``score(model_dir)`` its validation score; ``inputs`` (keys of the data and of
    the document embeddings) name the study with the base settings and the space."""
    from finetune.listwise import train_listwise
    from tasks.core.store import stage_key

    params = JUDGED_PARAMS if with_pseudo else tuple(p for p in JUDGED_PARAMS if p != "pseudo_per_judged")
    bounds = {
        "label_weight": space.search_label_weight,
        "pseudo_per_judged": space.search_pseudo_per_judged,
        "learning_rate": space.search_listwise_learning_rate,
    }
    defaults = {p: getattr(base, p) for p in params if _inside(getattr(base, p), bounds[p])}

    def objective(trial: Any, model_dir: Path) -> float:
        values = {
            p: trial.suggest_float(p, bounds[p][0], bounds[p][1], log=p == "learning_rate") for p in params
        }
        config = base.model_copy(update=values)
        result = train_listwise(
            start_model,
            lists_for(config.pseudo_per_judged if with_pseudo else 0.0),
            document_vectors,
            config,
            model_dir,
        )
        trial.set_user_attr("seconds", result.seconds)
        trial.set_user_attr("steps", result.steps)
        return float(score(result.model_dir))

    name = stage_key(
        "judged-search",
        {
            "base": base.model_dump(mode="json"),
            "space": space.model_dump(mode="json"),
            "pseudo": with_pseudo,
            "metric": metric,
        },
        inputs=list(inputs),
    )
    return run_study(
        name,
        workdir,
        objective,
        trials=trials,
        seed=seed,
        metric=metric,
        defaults=defaults,
        params=params,
        on_trial=on_trial,
    )
