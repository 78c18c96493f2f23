"""Listwise distillation on the query side, over cached document embeddings.

The document tower stays frozen: its corpus embeddings (already computed for mining) are constants,
so an optimizer step encodes only its queries (a claim-length query is a fraction of the 128-token
passages a MarginMSE row encodes), the search index stays valid and the "after" evaluation encodes
only queries. Each query comes with a list of candidate documents (the teacher's top ones plus a
sample from the rest of the corpus) and the teacher's score of each; the loss is the KL divergence
between the teacher's softmax over the list and the student's (RocketQAv2; Tamber et al. 2025).

Two temperatures, not sentence-transformers' ``DistillKLDivLoss`` (one temperature for both
sides): the student's scores are cosines in [-1, 1] and need a small temperature (0.05) to express a
peaked distribution, while the offline teacher's scores are z-scores (a spread of a few units) on
which a temperature of 0.05 would make a one-hot. The teacher's is 0.5: on SciFact's train claims a
softer teacher (1, 2) taught worse (benchmarks/README.md has the runs). The loop is written by hand because every sentence-transformers loss embeds each
column with the model being trained; here the documents are constants.

Checkpoints (model, optimizer, schedule, random state, elapsed time) are written every
``save_steps`` through a staging folder; a rerun with the same output directory resumes there and
reaches the same weights as a run that was never interrupted. ``average_with_start`` mixes the
trained weights with the start model's at the end (WiSE-FT, Wortsman et al. 2022), a guard against
drifting away from what the start model already ranked well.

With judged queries (:class:`CandidateLists` ``relevance``), a second term joins the KL: the
contrastive loss of sentence-transformers' ``MultipleNegativesRankingLoss`` with several positives,
``-log`` of the student's softmax mass on the judged documents of the list, its negatives being the
list's other documents (the teacher's hardest ones, mined from the whole corpus). Candidates marked
-1 (unjudged documents the teacher ranks above every judged one: likely relevant but unjudged, the
margin filter of ``mine_hard_negatives``) are left out of that term's softmax, not of the KL.
Written here rather than with the sentence-transformers loss for the same reason as the KL: the
documents are constants, and its losses embed every column with the model being trained.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune.guards import check_loss
from finetune.marginmse import TrainResult, _save_model, finished_run
from tasks import _env  # noqa: F401
from tasks.core.store import write_json_atomic

log = logging.getLogger(__name__)

SPEED_STEPS = 10  # steps timed before a time budget re-plans the schedule


class ListwiseConfig(BaseModel):
    """Query-side listwise distillation settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: float = Field(
        2.0,
        gt=0,
        description="passes over the training queries (unless max-steps is set); the time budget "
        "usually ends training first",
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    time_budget_minutes: float | None = Field(
        20.0,
        gt=0,
        description="stop (and keep the model) after this many minutes of training; the learning-rate "
        "schedule is planned to end there (20 minutes beat 10 on SciFact's train claims)",
    )
    batch_size: int = Field(32, ge=1, description="queries per optimizer step")
    learning_rate: float = Field(
        2e-4,
        gt=0,
        description="peak learning rate (AdamW); 2e-4 beat 1e-4 and 5e-5 on SciFact's train claims",
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    max_seq_length: int = Field(64, ge=8, le=8192, description="tokens kept per query in training")
    student_temperature: float = Field(
        0.05, gt=0, description="divides the student's cosines before the softmax over a query's list"
    )
    teacher_temperature: float = Field(
        0.5,
        gt=0,
        description="divides the teacher's scores (z-scores for the offline teacher): below 1 sharpens "
        "the teacher's softmax toward its first documents",
    )
    freeze_layers: int = Field(
        0, ge=0, description="transformer layers (and the embeddings) kept frozen, counted from the bottom"
    )
    average_with_start: float = Field(
        0.5, ge=0, lt=1, description="share of the start model's weights mixed into the result (WiSE-FT)"
    )
    save_steps: int = Field(50, ge=1, description="checkpoint every this many steps (a rerun resumes there)")
    logging_steps: int = Field(10, ge=1, description="record the training loss every this many steps")
    seed: int = Field(13, description="random seed")


class JudgedListwiseConfig(ListwiseConfig):
    """Listwise training on judged queries (with or without generated ones): the KL to the teacher
    plus the contrastive term on the judged documents."""

    label_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the contrastive term on the judged documents of each list (the "
        "teacher's KL has weight 1; 0: the teacher alone)",
    )
    pseudo_per_judged: float = Field(
        4.0,
        ge=0,
        description="with pseudo-labels: generated queries (and their teacher lists) mixed in per "
        "judged training query, a seeded sample",
    )


@dataclass
class CandidateLists:
    """Per training query: its text, candidate rows of the document matrix and the teacher's scores;
    ``relevance`` (optional, judged queries): 1 for a judged document, 0 for a negative, -1 for a
    candidate left out of the contrastive term (a row of zeros: a query with no judgment)."""

    queries: list[str]
    candidates: np.ndarray  # (n, k) int64 rows of the document matrix
    scores: np.ndarray  # (n, k) float32 teacher scores
    relevance: np.ndarray | None = None  # (n, k) int8

    def __post_init__(self) -> None:
        self.candidates = np.asarray(self.candidates, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        shapes = {self.candidates.shape, self.scores.shape}
        if self.relevance is not None:
            self.relevance = np.asarray(self.relevance, dtype=np.int8)
            shapes.add(self.relevance.shape)
        if len(shapes) != 1 or len(self.candidates) != len(self.queries):
            raise ValueError(
                f"candidate lists do not line up: {len(self.queries)} queries, candidates "
                f"{self.candidates.shape}, scores {self.scores.shape}"
                + (f", relevance {self.relevance.shape}" if self.relevance is not None else "")
            )

    @classmethod
    def from_table(cls, table: Any, text_of: dict[str, str], row_of: dict[str, int]) -> CandidateLists:
        """The lists of a candidate-lists stage table (``query_id, doc_ids, scores``): query texts by
        ``text_of[query_id]``, documents as their rows ``row_of[doc_id]`` of the document matrix."""
        return cls(
            [text_of[q] for q in table["query_id"]],
            np.asarray([[row_of[d] for d in ids] for ids in table["doc_ids"]], dtype=np.int64),
            np.stack([np.asarray(s, dtype=np.float32) for s in table["scores"]]),
        )

    def digest(self) -> str:
        """Content digest of the lists (queries, candidates, scores, relevance): keys a training run."""
        import hashlib

        digest = hashlib.sha256()
        for text in self.queries:
            digest.update(text.encode() + b"\x1f")
        for array in (self.candidates, self.scores, self.relevance):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:20]

    def __len__(self) -> int:
        return len(self.queries)


def listwise_loss(student: Any, teacher: Any, student_temperature: float, teacher_temperature: float) -> Any:
    """KL(teacher softmax || student softmax) over each row's list, averaged over rows."""
    from torch.nn import functional as F

    target = F.softmax(teacher / teacher_temperature, dim=-1)
    log_student = F.log_softmax(student / student_temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean")


def judged_loss(student: Any, relevance: Any, student_temperature: float) -> Any:
    """Contrastive loss on judged documents: ``-log`` of the student's softmax mass on a row's
    positives (relevance 1) against its negatives (0), candidates at -1 left out; averaged over the
    rows that have a positive (0 when none has)."""
    import torch

    logits = (student / student_temperature).masked_fill(relevance < 0, float("-inf"))
    positive = logits.masked_fill(relevance <= 0, float("-inf"))
    judged = (relevance > 0).any(dim=-1)
    if not bool(judged.any()):
        return student.sum() * 0.0
    per_row = torch.logsumexp(logits[judged], dim=-1) - torch.logsumexp(positive[judged], dim=-1)
    return per_row.mean()


def _freeze(model: Any, layers: int) -> None:
    """Freeze the embeddings and the lowest ``layers`` transformer layers (BERT-style encoders)."""
    if layers <= 0:
        return
    backbone = model[0].auto_model
    encoder = getattr(backbone, "encoder", None)
    blocks = getattr(encoder, "layer", None)
    if blocks is None:
        raise ValueError(f"freeze_layers: {type(backbone).__name__} has no encoder.layer list to freeze")
    for module in [backbone.embeddings, *list(blocks)[:layers]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def _batch_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The queries of optimizer step ``step``: epoch ``e`` is a permutation seeded by (seed, e), so
    any step's batch is known without replaying the ones before it (what resuming needs)."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, within = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[within * batch_size : (within + 1) * batch_size].tolist()


def _save_checkpoint(folder: Path, model: Any, optimizer: Any, schedule: Any, state: dict[str, Any]) -> None:
    import torch

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        staging / "state.pt",
    )
    write_json_atomic(staging / "progress.json", state)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def train_listwise(
    base_model: Any,
    lists: CandidateLists,
    document_vectors: np.ndarray,
    config: ListwiseConfig,
    output_dir: str | Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train the query side of ``base_model`` (a name/dir or a loaded SentenceTransformer) so its
    softmax over each query's candidates matches the teacher's; ``document_vectors`` are the fixed,
    unit-length document embeddings the candidate rows index.

    ``output_dir`` holds ``checkpoint/`` while training and ``model/`` + ``result.json`` when done
    (a rerun then does no work). Returns the same :class:`TrainResult` as MarginMSE training.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from torch.nn import functional as F

    from tasks.core.models import load_sentence_transformer

    if len(lists) < 2:
        raise ValueError(f"need at least 2 training queries, got {len(lists)}")
    output_dir = Path(output_dir)
    if (finished := finished_run(output_dir)) is not None:
        return finished
    checkpoint = output_dir / "checkpoint"
    torch.manual_seed(config.seed)
    model = (
        base_model if isinstance(base_model, SentenceTransformer) else load_sentence_transformer(base_model)
    )
    model.max_seq_length = config.max_seq_length
    start_weights = (
        {k: v.detach().clone() for k, v in model.state_dict().items()} if config.average_with_start else None
    )
    _freeze(model, config.freeze_layers)
    documents = torch.from_numpy(np.array(document_vectors, dtype=np.float32))  # a writable copy
    steps_per_epoch = max(1, math.ceil(len(lists) / config.batch_size))
    max_steps = config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    # Linear warm-up and decay over the planned steps. Under a time budget the plan is re-made once
    # the speed is known (after SPEED_STEPS steps) so the rate reaches zero when the budget ends,
    # instead of the run being cut off at a high rate.
    plan = {"steps": max_steps}

    def rate(current: int) -> float:
        total = plan["steps"]
        warm = int(round(config.warmup_ratio * total))
        if current < warm:
            return current / max(1, warm)
        return max(0.0, (total - current) / max(1, total - warm))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    step, elapsed, history, resumed = 0, 0.0, [], None
    if (checkpoint / "state.pt").is_file():
        saved = torch.load(checkpoint / "state.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["torch_rng"])
        state = json.loads((checkpoint / "progress.json").read_text())
        step, elapsed, history = state["step"], state["seconds"], state["history"]
        plan["steps"] = state.get("planned_steps", max_steps)
        resumed = str(checkpoint)
        log.info("training: resumed at step %d of %d from %s", step, max_steps, checkpoint)
    budget = (config.time_budget_minutes or math.inf) * 60.0
    stopped = None
    model.train()
    began = time.time() - elapsed
    while step < plan["steps"]:
        if time.time() - began > budget:
            stopped = "time budget"
            break
        batch = _batch_order(len(lists), config.batch_size, step, config.seed)
        features = model.preprocess([lists.queries[i] for i in batch])
        query = F.normalize(model(dict(features))["sentence_embedding"], dim=-1)
        candidates = documents[torch.from_numpy(lists.candidates[batch])]  # (b, k, d)
        student = torch.einsum("bd,bkd->bk", query, candidates)
        teacher = torch.from_numpy(lists.scores[batch])
        loss = listwise_loss(student, teacher, config.student_temperature, config.teacher_temperature)
        label_weight = getattr(config, "label_weight", 0.0)
        if lists.relevance is not None and label_weight:
            relevance = torch.from_numpy(lists.relevance[batch])
            loss = loss + label_weight * judged_loss(student, relevance, config.student_temperature)
        check_loss(float(loss.detach()), step + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step == SPEED_STEPS and math.isfinite(budget) and plan["steps"] == max_steps:
            per_second = step / max(time.time() - began, 1e-6)
            plan["steps"] = max(step + 1, min(max_steps, int(per_second * budget)))
            log.info("training: %.2f steps/s, %d steps fit the time budget", per_second, plan["steps"])
        if step % config.logging_steps == 0 or step == plan["steps"]:
            history.append(
                {
                    "loss": float(loss.detach()),
                    "step": float(step),
                    "learning_rate": schedule.get_last_lr()[0],
                }
            )
        if progress:
            progress(step, plan["steps"])
        if step % config.save_steps == 0 and step < plan["steps"]:
            _save_checkpoint(
                checkpoint,
                model,
                optimizer,
                schedule,
                {
                    "step": step,
                    "seconds": time.time() - began,
                    "history": history,
                    "planned_steps": plan["steps"],
                },
            )
    model.eval()
    seconds = time.time() - began
    if start_weights is not None:  # WiSE-FT: a point on the line from the start model to the trained one
        mix = config.average_with_start
        trained = model.state_dict()
        model.load_state_dict(
            {
                k: (mix * start_weights[k] + (1 - mix) * v) if v.is_floating_point() else v
                for k, v in trained.items()
            }
        )
    final_dir = output_dir / "model"
    _save_model(model, output_dir, final_dir)
    result = TrainResult(
        model_dir=final_dir,
        steps=step,
        seconds=round(seconds, 1),
        label_scale=1.0,
        train_rows=len(lists),
        eval_rows=0,
        resumed_from=resumed,
        stopped_early=stopped,
        history=history,
    )
    write_json_atomic(output_dir / "result.json", {**asdict(result), "model_dir": str(final_dir)})
    shutil.rmtree(checkpoint, ignore_errors=True)
    return result
