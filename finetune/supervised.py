"""Supervised fine-tuning of a bi-encoder from labels, with sentence-transformers' trainer and losses.

Losses (all from sentence-transformers; any data layout feeds any loss through the views of
``tasks.labelled.splits``):

* ``mnrl``: MultipleNegativesRankingLoss on (anchor, positive[, negative]) rows, the other rows'
  positives as in-batch negatives;
* ``cached-mnrl``: CachedMultipleNegativesRankingLoss, the same with GradCache, so a large batch
  (more in-batch negatives) fits in memory: ``mini_batch_size`` texts go through the model at once;
* ``online-contrastive``: OnlineContrastiveLoss on labelled pairs (hard positives and negatives
  of each batch);
* ``batch-hard-triplet``: BatchHardTripletLoss on (text, group) rows, the triplet-margin loss with a
  batch-hard miner of hosted services; ``batch-hard-soft-margin-triplet`` its margin-free variant;
* ``mnrl+contrastive``: MNRL and OnlineContrastiveLoss in turns (multi-task), the combination
  sentence-transformers' Quora duplicate-questions example trains with.

``hard_negatives`` > 0 gives every MNRL row that many mined negatives (sentence-transformers'
``mine_hard_negatives`` with the base model over all training texts), so the loss also has to
beat the nearest wrong texts, not only the random ones of the batch.
``matryoshka_dims`` wraps the loss in MatryoshkaLoss. Batching is group-aware: MNRL batches never
hold two rows of one duplicate group (their positives would be each other's false negatives),
triplet batches hold at least two texts of each group they draw from.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.distributed import is_main, processes_field, world
from finetune.guards import divergence_callback, no_model_card_widgets, quiet_trainer_logs
from tasks.labelled.eval_set import EvalSet
from tasks.labelled.evaluation import LabelledReport, evaluate_labelled
from tasks.labelled.readers import LabelledData
from tasks.labelled.splits import labelled_pairs, positive_pairs, text_groups

log = logging.getLogger(__name__)

LossName = Literal[
    "mnrl",
    "cached-mnrl",
    "online-contrastive",
    "batch-hard-triplet",
    "batch-hard-soft-margin-triplet",
    "mnrl+contrastive",
]
LOSSES: tuple[str, ...] = LossName.__args__  # type: ignore[attr-defined]
# The loss "auto" picks for each layout of the data. For labelled pairs, OnlineContrastiveLoss: on
# a held-out fifth of Quora dev.tsv it was the only loss that raised both MRR@10 (0.893 -> 0.895)
# and pair AP (0.850 -> 0.889) of all-MiniLM-L6-v2; MNRL alone left both where they were (that
# model was trained on Quora duplicates with MNRL already), mnrl+contrastive lowered MRR@10.
DEFAULT_LOSS = {"pairs": "online-contrastive", "groups": "batch-hard-triplet", "triplets": "mnrl"}
GROUP_COLUMN = "group"


class TrainSettings(BaseModel):
    """How one model is fine-tuned: the single source of these defaults for the flow, the CLI and
    the hyper-parameter search."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        "all-MiniLM-L6-v2",
        description="base model: a local directory, a bundled name or a hub id; over a corpus also a "
        "registry version of `adapt text` (its query side trained on, its documents kept)",
    )
    loss: Literal["auto", *LOSSES] = Field(  # type: ignore[valid-type]
        "auto",
        description="training loss; auto: online-contrastive for labelled pairs, mnrl for (query, positive) "
        "rows, batch-hard-triplet for label groups",
    )
    epochs: float = Field(1.0, gt=0, le=100, description="passes over the training data")
    batch_size: int = Field(
        32, ge=4, le=65536, description="rows per training batch (in-batch negatives for mnrl)"
    )
    learning_rate: float = Field(2e-5, gt=0, lt=1, description="peak learning rate (AdamW, linear decay)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps with a rising learning rate")
    max_seq_length: int = Field(128, ge=8, le=8192, description="tokens per text kept by the encoder")
    mini_batch_size: int = Field(
        32, ge=1, description="cached-mnrl: texts per forward pass (memory, not results)"
    )
    triplet_margin: float = Field(0.3, gt=0, description="batch-hard-triplet: margin on the cosine distance")
    matryoshka_dims: list[int] = Field(
        default_factory=list,
        description="also train truncated embeddings of these sizes (MatryoshkaLoss), e.g. 384 256 128 64; "
        "none: off",
    )
    hard_negatives: int = Field(
        0,
        ge=0,
        le=10,
        description="mnrl losses: mined hard negatives per (anchor, positive) row without a negative of its own, the base model's nearest "
        "training texts that are not duplicates of the anchor (and score below 95% of the positive); 0: off",
    )
    seed: int = Field(0, description="random seed of training and data splits")
    train_processes: int = processes_field(
        " (the MNRL losses' in-batch negatives from all); the final training only, not search trials"
    )

    def resolved_loss(self, kind: str) -> str:
        return DEFAULT_LOSS[kind] if self.loss == "auto" else self.loss


@dataclass
class TrainResult:
    """What a training run produced: the model directory and how it went."""

    model_dir: str
    base_model: str
    loss: str
    settings: dict[str, Any]
    rows: int
    steps: int
    seconds: float
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ datasets


# A mined text scoring above this share of the positive's score is left out: on Quora-like data the
# nearest "negatives" are often unlabelled duplicates (the 95% rule of NV-Retriever, which
# sentence-transformers' mine_hard_negatives implements as relative_margin).
HARD_NEGATIVE_RELATIVE_MARGIN = 0.05


def training_datasets(
    data: LabelledData,
    loss: str,
    *,
    seed: int = 0,
    miner: Any = None,
    hard_negatives: int = 0,
    show_progress: bool = False,
) -> dict[str, Any]:
    """The datasets.Dataset(s) a loss trains on, by name (``mnrl``, ``contrastive``, ``triplet``).

    ``miner`` (a SentenceTransformer) with ``hard_negatives`` > 0 adds that many mined negatives to
    each MNRL row (see ``mine_negatives``)."""
    from datasets import Dataset

    tables = {}
    if loss in {"mnrl", "cached-mnrl", "mnrl+contrastive"}:
        tables["mnrl"] = positive_pairs(data)
        if miner is not None and hard_negatives > 0 and "negative" in tables["mnrl"].columns:
            log.warning("hard_negatives: the rows give their own negatives; none mined")
        elif miner is not None and hard_negatives > 0:
            tables["mnrl"], unmined = mine_negatives(
                data, tables["mnrl"], miner, hard_negatives, verbose=show_progress
            )
            if len(unmined):
                tables["mnrl-unmined"] = unmined
    if loss in {"online-contrastive", "mnrl+contrastive"}:
        tables["contrastive"] = labelled_pairs(data, seed=seed)
    if loss in {"batch-hard-triplet", "batch-hard-soft-margin-triplet"}:
        tables["triplet"] = text_groups(data)
    datasets = {}
    for name, table in tables.items():
        if name == "contrastive" and table["label"].nunique() < 2:
            raise ValueError(f"{loss} needs duplicate and non-duplicate pairs; the data gives only one kind")
        if name == "triplet" and (table["label"].value_counts() >= 2).sum() < 2:
            raise ValueError(f"{loss} needs at least two groups of two or more texts")
        if table.empty:
            raise ValueError(f"{loss}: no training rows in the data")
        datasets[name] = Dataset.from_pandas(table, preserve_index=False)
    return datasets


def mine_negatives(
    data: LabelledData, table: Any, model: Any, count: int, *, verbose: bool = False
) -> tuple[Any, Any]:
    """``anchor, positive, negative, group`` rows, each (anchor, positive) row of ``table`` once per
    mined negative, and the ``anchor, positive, group`` rows that kept no negative.

    Candidates are all distinct texts of the training data; sentence-transformers'
    ``mine_hard_negatives`` ranks them with ``model`` and drops any that scores within
    ``HARD_NEGATIVE_RELATIVE_MARGIN`` of the positive. Mined texts of the anchor's own duplicate group
    (duplicates of duplicates, which the library cannot know of) are dropped here. Rows that keep no
    negative train without one (a dataset of their own: MNRL needs the same columns in a batch),
    so no labelled pair is lost.
    """
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    base = table
    group_of: dict[str, str] = {}
    for column in ("anchor", "positive"):
        group_of.update(zip(base[column], base["group"], strict=True))
    corpus = sorted(set(_all_texts(data)))
    mined = mine_hard_negatives(
        Dataset.from_pandas(base[["anchor", "positive"]], preserve_index=False),
        model,
        corpus=corpus,
        relative_margin=HARD_NEGATIVE_RELATIVE_MARGIN,
        num_negatives=count,
        sampling_strategy="top",
        output_format="triplet",
        batch_size=64,
        use_faiss=len(corpus) > 50_000,
        verbose=verbose,  # the library's progress bars and score statistics
    ).to_pandas()
    mined["group"] = mined["anchor"].map(group_of)
    mined = mined[mined["negative"].map(group_of) != mined["group"]]
    covered = set(zip(mined["anchor"], mined["positive"], strict=True))
    missing = base[[(a, p) not in covered for a, p in zip(base["anchor"], base["positive"], strict=True)]]
    log.info(
        "mined %d hard negatives for %d of %d rows (%d train without one)",
        len(mined),
        len(base) - len(missing),
        len(base),
        len(missing),
    )
    return mined[["anchor", "positive", "negative", "group"]].reset_index(drop=True), missing.reset_index(
        drop=True
    )


def _all_texts(data: LabelledData) -> list[str]:
    rows = data.rows
    columns = {"pairs": ["text1", "text2"], "groups": ["text"], "triplets": ["query", "positive", "negative"]}
    return [t for c in columns[data.kind] if c in rows for t in rows[c].dropna().astype(str)]


def _make_collator(model: Any):
    """The trainer's collator, minus the ``group`` column.

    The column is in the MNRL dataset only so that sentence-transformers' NoDuplicatesBatchSampler,
    which keeps any value from appearing twice in a batch, also keeps two rows of one duplicate
    group apart; it must not reach the loss as a text. (No sampler of the library takes a group
    column, hence this small subclass.)
    """
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    @dataclass
    class GroupDroppingCollator(SentenceTransformerDataCollator):
        def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
            return super().__call__([{k: v for k, v in f.items() if k != GROUP_COLUMN} for f in features])

    return GroupDroppingCollator(preprocess_fn=model.preprocess)


def build_loss(model: Any, dataset_name: str, settings: TrainSettings, loss: str):
    """The sentence-transformers loss module for one dataset."""
    from sentence_transformers.sentence_transformer import losses

    # under torchrun every process's batch share is a negative for every anchor, as in one process
    distributed = world()[1] > 1
    if dataset_name.startswith("mnrl"):
        module = (
            losses.CachedMultipleNegativesRankingLoss(
                model,
                mini_batch_size=settings.mini_batch_size,
                show_progress_bar=False,
                gather_across_devices=distributed,
            )
            if loss == "cached-mnrl"
            else losses.MultipleNegativesRankingLoss(model, gather_across_devices=distributed)
        )
    elif dataset_name == "contrastive":
        module = losses.OnlineContrastiveLoss(model)
    elif loss == "batch-hard-soft-margin-triplet":
        module = losses.BatchHardSoftMarginTripletLoss(
            model, distance_metric=losses.BatchHardTripletLossDistanceFunction.cosine_distance
        )
    else:
        module = losses.BatchHardTripletLoss(
            model,
            distance_metric=losses.BatchHardTripletLossDistanceFunction.cosine_distance,
            margin=settings.triplet_margin,
        )
    if settings.matryoshka_dims:
        dimension = model.get_embedding_dimension()
        too_big = [d for d in settings.matryoshka_dims if d > dimension]
        if too_big:
            raise ValueError(f"matryoshka_dims {too_big} exceed the model's embedding size {dimension}")
        module = losses.MatryoshkaLoss(
            model, module, matryoshka_dims=sorted(set(settings.matryoshka_dims), reverse=True)
        )
    return module


# -------------------------------------------------------------------------------------- evaluator


def make_evaluator(eval_set: EvalSet, metric: str, *, batch_size: int = 64):
    """A sentence-transformers evaluator over an ``EvalSet``, for evaluations during training.

    Written by hand because InformationRetrievalEvaluator cannot leave a query's own text out of
    its hits (its source says so), and here every query is also in the index. It runs
    ``tasks.labelled.evaluate_labelled`` (ir-measures, BinaryClassificationEvaluator's thresholds).
    """
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator

    class LabelledEvaluator(BaseEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.primary_metric = metric_key(metric)
            self.last_report: LabelledReport | None = None

        def __call__(self, model, output_path=None, epoch: float = -1, steps: int = -1) -> dict[str, float]:
            report = evaluate_labelled(
                model,
                eval_set,
                system="training",
                batch_size=batch_size,
                max_seq_length=None,
                show_progress=False,
            )
            self.last_report = report
            return {metric_key(name): value for name, value in report.metrics.items()}

    return LabelledEvaluator()


def metric_key(name: str) -> str:
    """A metric name as the trainer logs it (no spaces)."""
    return name.replace(" ", "_")


# -------------------------------------------------------------------------------------- training


def train_supervised(
    data: LabelledData,
    settings: TrainSettings,
    output_dir: str | Path,
    *,
    evaluator: Any = None,
    evaluations: int = 0,
    callbacks: Sequence[Any] = (),
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune ``settings.model`` on ``data``; the model is saved to ``output_dir`` (written
    under a temporary name and renamed, so the directory is complete or absent).

    ``evaluator`` with ``evaluations`` > 0 runs that many evaluations spread over the training
    (the last at the end); ``callbacks`` are transformers TrainerCallbacks (e.g. pruning).
    """
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import (
        MultiDatasetBatchSamplers,
        SentenceTransformerTrainingArguments,
    )

    from tasks.core.models import load_sentence_transformer

    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(f"{output_dir} exists; a training run writes a new directory")
    loss_name = settings.resolved_loss(data.kind)
    start = time.time()
    model = load_sentence_transformer(settings.model, max_seq_length=settings.max_seq_length)
    datasets = training_datasets(
        data,
        loss_name,
        seed=settings.seed,
        miner=model,
        hard_negatives=settings.hard_negatives,
        show_progress=show_progress,
    )
    losses = {name: build_loss(model, name, settings, loss_name) for name in datasets}
    rows = sum(len(d) for d in datasets.values())
    steps_per_epoch = sum(math.ceil(len(d) / settings.batch_size) for d in datasets.values())
    total_steps = max(1, math.ceil(steps_per_epoch * settings.epochs))
    eval_steps = (
        max(1, math.ceil(total_steps / evaluations)) if evaluator is not None and evaluations else None
    )

    History, EvaluateAtEnd = _callbacks()
    history = History(evaluator.primary_metric if eval_steps else None)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        args = SentenceTransformerTrainingArguments(
            output_dir=str(scratch / "checkpoints"),
            num_train_epochs=settings.epochs,
            # under torchrun (DDP) each process takes an equal share of a step's rows
            per_device_train_batch_size=max(1, settings.batch_size // world()[1]),
            ddp_backend="gloo" if world()[1] > 1 else None,
            learning_rate=settings.learning_rate,
            warmup_steps=settings.warmup_ratio,  # a float below 1: a share of the steps (transformers 5)
            lr_scheduler_type="linear",
            batch_sampler=_per_dataset_sampler,
            multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL,
            eval_strategy="steps" if eval_steps else "no",
            eval_steps=eval_steps,
            save_strategy="no",
            logging_steps=max(1, min(50, total_steps // 20)),
            logging_nan_inf_filter=False,  # a NaN loss must reach the divergence guard
            report_to="none",
            seed=settings.seed,
            data_seed=settings.seed,
            use_cpu=True,
            disable_tqdm=not show_progress,
            dataloader_drop_last=False,
        )
        no_model_card_widgets(model)
        multi = len(datasets) > 1
        trainer = SentenceTransformerTrainer(
            model=model,
            args=args,
            train_dataset=datasets if multi else next(iter(datasets.values())),
            loss=losses if multi else next(iter(losses.values())),
            evaluator=evaluator if eval_steps else None,
            data_collator=_make_collator(model),
            callbacks=[history, divergence_callback(), *callbacks],
        )
        if eval_steps:
            trainer.add_callback(EvaluateAtEnd())
        quiet_trainer_logs(trainer)
        trainer.train()
        if is_main():  # one writer: every process holds the same weights
            staged = scratch / "model"
            model.save(str(staged), create_model_card=False)
            staged.rename(output_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return TrainResult(
        model_dir=str(output_dir),
        base_model=settings.model,
        loss=loss_name,
        settings=settings.model_dump(mode="json"),
        rows=rows,
        steps=history.steps,
        seconds=round(time.time() - start, 2),
        loss_history=history.losses,
        eval_history=history.evals,
        stopped_early=history.steps < history.max_steps,
    )


def _callbacks():
    """Trainer callbacks, defined on first use (transformers is slow to import)."""
    from transformers import TrainerCallback

    class History(TrainerCallback):
        """Training loss and the primary evaluation value as the trainer logs them."""

        def __init__(self, metric: str | None) -> None:
            self.metric = f"eval_{metric}" if metric else None
            self.losses: list[tuple[int, float]] = []
            self.evals: list[tuple[int, float]] = []
            self.steps = 0
            self.max_steps = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append((state.global_step, float(logs["loss"])))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if metrics and self.metric in metrics:
                self.evals.append((state.global_step, float(metrics[self.metric])))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps, self.max_steps = state.global_step, state.max_steps

    class EvaluateAtEnd(TrainerCallback):
        """An evaluation after the last step too, whatever the step count."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True

    return History, EvaluateAtEnd


def _per_dataset_sampler(dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
    """Each dataset of a multi-task run batched as its loss needs: NO_DUPLICATES for MNRL rows (they
    have a group column), GROUP_BY_LABEL for (text, label) rows, plain shuffled batches otherwise.
    Written because the trainer takes one sampler setting for all datasets of a run."""
    from sentence_transformers.base.sampler import (
        DefaultBatchSampler,
        GroupByLabelBatchSampler,
        NoDuplicatesBatchSampler,
    )
    from torch.utils.data import RandomSampler

    kwargs = dict(batch_size=batch_size, drop_last=drop_last, generator=generator, seed=seed)
    kwargs["valid_label_columns"] = valid_label_columns
    columns = set(dataset.column_names)
    if GROUP_COLUMN in columns:
        return NoDuplicatesBatchSampler(dataset, **kwargs)
    if columns - {"dataset_name"} == {"text", "label"}:
        return GroupByLabelBatchSampler(dataset, **kwargs)
    return DefaultBatchSampler(RandomSampler(dataset, generator=generator), **kwargs)
