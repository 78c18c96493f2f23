"""Bi-encoder distillation with MarginMSE (GPL's training step), on sentence-transformers' trainer.

Input: rows of (query, positive, negative_1..n) texts with the teacher's margins
``score(q, pos) - score(q, neg_i)``; output: a sentence-transformers model directory.

The teacher's margins live on the teacher's scale (cross-encoder logits, or z-scores for the
offline teacher) while a normalised bi-encoder's scores are cosines; ``label_scale`` maps one
onto the other. Left unset, it is fitted on the data before training (least squares of the
student's initial margins on the teacher's), so the loss asks the student to re-rank, not to
blow up its score range.

Checkpoints are written every ``save_steps``; a rerun with the same output directory resumes from
the last one. A held-out slice of the rows gives an evaluation loss during training, and the
loss curve is returned (and plotted by the caller).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune.distributed import is_main, processes_field, world
from finetune.guards import (
    StepProgress,
    TimeBudget,
    check_loss,
    divergence_callback,
    no_model_card_widgets,
    quiet_trainer_logs,
)
from tasks import _env  # noqa: F401
from tasks.core.store import write_json_atomic

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """MarginMSE training settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: float = Field(
        1.0, gt=0, description="passes over the training rows (ignored when max-steps is set)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    time_budget_minutes: float | None = Field(
        None, gt=0, description="stop (and keep the model) after this many minutes of training"
    )
    batch_size: int = Field(16, ge=1, description="queries per optimizer step (each with its negatives)")
    negatives_per_query: int = Field(4, ge=1, le=64, description="negatives per query in one training row")
    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    max_seq_length: int = Field(
        128,
        ge=8,
        le=8192,
        description="tokens kept per passage in training (128 costs half the time per step of 256 on a CPU)",
    )
    label_scale: float | None = Field(
        None,
        gt=0,
        description="multiplier from teacher margins to student cosine margins (none: fitted on the data)",
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="share of query rows held out for the eval loss"
    )
    eval_max_rows: int = Field(
        256,
        ge=1,
        description="most query rows held out for the eval loss (each "
        "evaluation encodes all of them: it costs training time)",
    )
    eval_steps: int = Field(50, ge=1, description="evaluate the held-out loss every this many steps")
    save_steps: int = Field(50, ge=1, description="checkpoint every this many steps (a rerun resumes there)")
    logging_steps: int = Field(10, ge=1, description="record the training loss every this many steps")
    seed: int = Field(13, description="random seed")
    processes: int = processes_field(" (DDP; MarginMSE on both sides only)")

    def key_settings(self) -> dict[str, Any]:
        """The settings that decide the trained model (a stage key's part): not how many processes ran."""
        return self.model_dump(mode="json", exclude={"processes"})


@dataclass
class TrainingRows:
    """Training rows: per query, its text, the positive passage, negatives and teacher margins."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]
    margins: list[list[float]]

    def __len__(self) -> int:
        return len(self.queries)

    @classmethod
    def from_table(cls, table: Any) -> TrainingRows:
        """From a table with ``query``, ``positive``, ``negatives`` and ``margins`` columns (what
        :func:`tasks.text.pipeline.training_table` builds from the labels stage)."""
        return cls(
            list(table["query"]),
            list(table["positive"]),
            [list(n) for n in table["negatives"]],
            [[float(m) for m in margins] for margins in table["margins"]],
        )


def cached_student_margins(
    query_cache: Any, doc_cache: Any | None = None
) -> Callable[[TrainingRows, list[int]], np.ndarray]:
    """The start model's margins for ``student_margins``, from embedding caches (``embed(texts)``).

    Queries come from ``query_cache``, passages from ``doc_cache`` (default: the same), for a student
    that keeps another model's document embeddings. Nothing already cached is encoded again.
    """
    doc_cache = doc_cache or query_cache

    def margins(rows: TrainingRows, indices: list[int]) -> np.ndarray:
        out = []
        for i in indices:
            query = query_cache.embed([rows.queries[i]])[0]
            positive = doc_cache.embed([rows.positives[i]])[0]
            negatives = doc_cache.embed(rows.negatives[i])
            out.append(query @ positive - negatives @ query)
        return np.concatenate(out)

    return margins


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    seconds: float
    label_scale: float
    train_rows: int
    eval_rows: int
    resumed_from: str | None
    stopped_early: str | None
    history: list[dict[str, float]] = field(default_factory=list)

    def loss_series(self) -> dict[str, list[tuple[float, float]]]:
        train = [(h["step"], h["loss"]) for h in self.history if "loss" in h]
        evaluation = [(h["step"], h["eval_loss"]) for h in self.history if "eval_loss" in h]
        return {"train loss": train, "held-out loss": evaluation}


def fit_label_scale(student_margins: np.ndarray, teacher_margins: np.ndarray) -> float:
    """Least-squares slope (through 0) of the student's margins on the teacher's."""
    teacher = np.asarray(teacher_margins, dtype=np.float64).ravel()
    student = np.asarray(student_margins, dtype=np.float64).ravel()
    denominator = float(teacher @ teacher)
    if denominator <= 0:
        return 1.0
    scale = float(student @ teacher) / denominator
    return scale if scale > 0 else 1.0


def _to_dataset(rows: TrainingRows, indices: Sequence[int], negatives: int, scale: float):
    from datasets import Dataset

    columns: dict[str, list[Any]] = {"query": [], "positive": []}
    for j in range(negatives):
        columns[f"negative_{j + 1}"] = []
    columns["label"] = []
    for i in indices:
        negs = rows.negatives[i][:negatives]
        margins = rows.margins[i][:negatives]
        if len(negs) < negatives:  # pad by repeating: every row needs the same width
            reps = math.ceil(negatives / len(negs))
            negs, margins = (negs * reps)[:negatives], (margins * reps)[:negatives]
        columns["query"].append(rows.queries[i])
        columns["positive"].append(rows.positives[i])
        for j in range(negatives):
            columns[f"negative_{j + 1}"].append(negs[j])
        columns["label"].append([float(m) * scale for m in margins])
    return Dataset.from_dict(columns)


def train_marginmse(
    base_model: Any,
    rows: TrainingRows,
    config: TrainConfig,
    output_dir: str | Path,
    *,
    student_margins: Callable[[TrainingRows, list[int]], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``base_model`` (a model name/dir or a loaded SentenceTransformer) on ``rows``.

    ``output_dir`` holds ``checkpoints/`` (resumable) and, when done, ``model/``.
    ``student_margins(rows, indices)`` gives the initial student's margins for fitting
    ``label_scale`` when it is not set (a cheap path through cached embeddings); without it
    the student encodes a sample of rows itself.
    """
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MarginMSELoss
    from transformers.trainer_utils import get_last_checkpoint

    from tasks.core.models import load_sentence_transformer

    if len(rows) < 2:
        raise ValueError(f"need at least 2 training rows, got {len(rows)}")
    output_dir = Path(output_dir)
    final_dir = output_dir / "model"
    done = output_dir / "result.json"
    if (finished := finished_run(output_dir)) is not None:  # a rerun does no work
        log.info("training: reused the finished run in %s (%d steps)", output_dir, finished.steps)
        return finished
    checkpoints = output_dir / "checkpoints"
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(rows)).tolist()
    n_eval = int(round(len(rows) * config.eval_fraction)) if config.eval_fraction else 0
    n_eval = min(n_eval, config.eval_max_rows, len(rows) - 1)
    eval_idx, train_idx = order[:n_eval], order[n_eval:]

    model = (
        base_model if isinstance(base_model, SentenceTransformer) else load_sentence_transformer(base_model)
    )
    model.max_seq_length = config.max_seq_length
    scale = config.label_scale or _fit_scale(model, rows, train_idx, student_margins, rng)
    log.info("label scale (teacher margin -> student cosine margin): %.5f", scale)
    width = config.negatives_per_query
    train_set = _to_dataset(rows, train_idx, width, scale)
    eval_set = _to_dataset(rows, eval_idx, width, scale) if eval_idx else None

    steps_per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
    max_steps = config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))
    # under torchrun the trainer runs DDP: each process takes its share of a step's queries, so a
    # step sees batch_size queries however many processes there are (MarginMSE has no in-batch terms)
    processes = world()[1]
    per_process = max(1, config.batch_size // processes)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(checkpoints),
        max_steps=max_steps,
        per_device_train_batch_size=per_process,
        per_device_eval_batch_size=per_process,
        ddp_backend="gloo" if processes > 1 else None,
        learning_rate=config.learning_rate,
        warmup_steps=int(round(config.warmup_ratio * max_steps)),
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if eval_set is not None else "no",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence guard
        report_to=[],
        disable_tqdm=progress is not None,
        use_cpu=True,
        fp16=False,
        bf16=False,
        dataloader_num_workers=0,
        save_only_model=False,
    )
    no_model_card_widgets(model)
    budget = TimeBudget(config.time_budget_minutes)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        loss=MarginMSELoss(model),
        callbacks=[budget.make(), StepProgress(progress).make(), divergence_callback()],
    )
    quiet_trainer_logs(trainer)
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        log.info("training: resumed from the checkpoint %s", resume)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - start
    if is_main():  # one writer: the other processes hold the same weights
        _save_model(model, output_dir, final_dir)
    history = [
        {k: float(v) for k, v in entry.items() if isinstance(v, (int, float))}
        for entry in trainer.state.log_history
    ]
    result = TrainResult(
        model_dir=final_dir,
        steps=int(trainer.state.global_step),
        seconds=round(seconds, 1),
        label_scale=scale,
        train_rows=len(train_idx),
        eval_rows=len(eval_idx),
        resumed_from=resume,
        stopped_early="time budget" if budget.hit else None,
        history=history,
    )
    if is_main():
        write_json_atomic(done, {**asdict(result), "model_dir": str(final_dir), "processes": processes})
    return result


def finished_run(output_dir: Path) -> TrainResult | None:
    """The result of a run that finished in ``output_dir`` before, if any."""
    done, final_dir = output_dir / "result.json", output_dir / "model"
    if not (done.is_file() and final_dir.is_dir()):
        return None
    log.info("training already finished in %s; reusing it", output_dir)
    saved = {k: v for k, v in json.loads(done.read_text()).items() if k != "processes"}
    return TrainResult(**{**saved, "model_dir": final_dir})


def _save_model(model: Any, output_dir: Path, final_dir: Path) -> None:
    """Write the model to ``final_dir`` through a staging folder: it is there whole or not at all."""
    staging = output_dir / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save(str(staging), create_model_card=False)
    shutil.rmtree(final_dir, ignore_errors=True)
    staging.rename(final_dir)


def _fit_scale(
    model: Any,
    rows: TrainingRows,
    indices: list[int],
    student_margins: Callable[[TrainingRows, list[int]], np.ndarray] | None,
    rng: np.random.Generator,
) -> float:
    sample = sorted(rng.choice(indices, size=min(256, len(indices)), replace=False).tolist())
    teacher = np.concatenate([np.asarray(rows.margins[i], dtype=np.float64) for i in sample])
    if student_margins is not None:
        student = np.asarray(student_margins(rows, sample), dtype=np.float64).ravel()
    else:
        queries = model.encode(
            [rows.queries[i] for i in sample], normalize_embeddings=True, convert_to_numpy=True
        )
        positives = model.encode(
            [rows.positives[i] for i in sample], normalize_embeddings=True, convert_to_numpy=True
        )
        student_parts = []
        for k, i in enumerate(sample):
            negs = model.encode(rows.negatives[i], normalize_embeddings=True, convert_to_numpy=True)
            student_parts.append(queries[k] @ positives[k] - negs @ queries[k])
        student = np.concatenate(student_parts)
    return fit_label_scale(student, teacher)


def train_query_side(
    base_model: Any,
    rows: TrainingRows,
    document_vectors: Callable[[Sequence[str]], np.ndarray],
    config: TrainConfig,
    output_dir: str | Path,
    *,
    student_margins: Callable[[TrainingRows, list[int]], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """MarginMSE on the query side only: passages keep their (cached) embeddings from the document
    encoder, so the document index stays valid and a step encodes only its queries.

    ``document_vectors(texts)`` returns the fixed unit-length passage embeddings. Written by hand
    because sentence-transformers' losses embed every column with the model being trained; here the
    passages are constants (about 1/6 of the encoder work of a full MarginMSE step, no re-indexing).
    Short by design (a nightly delta), so it keeps no checkpoints: a crashed run starts over from the
    stored labels. Returns the same :class:`TrainResult` as :func:`train_marginmse`.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from torch.nn import functional as F
    from transformers import get_linear_schedule_with_warmup

    from tasks.core.models import load_sentence_transformer

    if len(rows) < 2:
        raise ValueError(f"need at least 2 training rows, got {len(rows)}")
    output_dir = Path(output_dir)
    final_dir = output_dir / "model"
    done = output_dir / "result.json"
    if (finished := finished_run(output_dir)) is not None:
        log.info("training: reused the finished run in %s (%d steps)", output_dir, finished.steps)
        return finished
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(rows)).tolist()
    model = (
        base_model if isinstance(base_model, SentenceTransformer) else load_sentence_transformer(base_model)
    )
    model.max_seq_length = config.max_seq_length
    scale = config.label_scale or _fit_scale(model, rows, order, student_margins, rng)
    width = config.negatives_per_query
    # fixed passage vectors and scaled teacher margins, one row per query (negatives cycled to `width`)
    positives = np.asarray(document_vectors(rows.positives), dtype=np.float32)
    negatives = np.stack(
        [
            np.asarray(document_vectors([n[j % len(n)] for j in range(width)]), dtype=np.float32)
            for n in rows.negatives
        ]
    )
    margins = np.asarray(
        [[m[j % len(m)] * scale for j in range(width)] for m in rows.margins], dtype=np.float32
    )

    steps_per_epoch = max(1, math.ceil(len(rows) / config.batch_size))
    max_steps = config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    schedule = get_linear_schedule_with_warmup(
        optimizer, int(round(config.warmup_ratio * max_steps)), max_steps
    )
    budget = (config.time_budget_minutes or math.inf) * 60.0
    history: list[dict[str, float]] = []
    model.train()
    start = time.time()
    step, stopped, epoch_order = 0, None, order
    while step < max_steps:
        if step and step % steps_per_epoch == 0:
            epoch_order = rng.permutation(len(rows)).tolist()
        first = (step % steps_per_epoch) * config.batch_size
        batch = epoch_order[first : first + config.batch_size]
        features = model.preprocess([rows.queries[i] for i in batch])
        query = F.normalize(model(dict(features))["sentence_embedding"], dim=-1)
        pos = torch.from_numpy(positives[batch])
        neg = torch.from_numpy(negatives[batch])
        student = (query * pos).sum(-1, keepdim=True) - torch.einsum("bd,bkd->bk", query, neg)
        loss = F.mse_loss(student, torch.from_numpy(margins[batch]))
        check_loss(float(loss.detach()), step + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % config.logging_steps == 0 or step == max_steps:
            history.append(
                {
                    "loss": float(loss.detach()),
                    "step": float(step),
                    "learning_rate": float(schedule.get_last_lr()[0]),
                }
            )
        if progress:
            progress(step, max_steps)
        if time.time() - start > budget and step < max_steps:
            stopped = "time budget"
            break
    model.eval()
    seconds = time.time() - start
    _save_model(model, output_dir, final_dir)
    result = TrainResult(
        model_dir=final_dir,
        steps=step,
        seconds=round(seconds, 1),
        label_scale=scale,
        train_rows=len(rows),
        eval_rows=0,
        resumed_from=None,
        stopped_early=stopped,
        history=history,
    )
    write_json_atomic(done, {**asdict(result), "model_dir": str(final_dir)})
    return result
