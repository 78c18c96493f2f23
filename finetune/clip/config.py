"""Settings and result of image/text training (:class:`ClipTrainConfig`, :class:`TrainResult`).

One pydantic model is the single source of the training defaults; the flow's config nests it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune.distributed import processes_field

log = logging.getLogger(__name__)


# the attributes alone, two of their subsets and the form shoppers type ("Men Navy Blue Shirts"): an
# image shows them, not the brand in the product name. On the fashion validation slice each step beat
# the caption set before it (benchmarks/results/clip_tune/). The last is also the template of the
# fashion benchmark's attribute queries (on products never trained on).
DEFAULT_EXTRA_CAPTION_TEMPLATES = (
    "{articleType}, {baseColour}, {gender}, {usage}",
    "{baseColour} {articleType}",
    "{gender} {articleType}",
    "{gender} {baseColour} {articleType}",
)


class ClipTrainConfig(BaseModel):
    """Training settings of both paths (locked-text and CLIP fine-tuning)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(
        54,
        ge=1,
        le=1000,
        description="passes over the training pairs (the most that run; the time budget may "
        "shorten the plan after the first and second epochs)",
    )
    max_train_minutes: float = Field(
        44.0,
        gt=0,
        description="training-time budget: after the first epoch the plan is cut to the epochs "
        "that fit at its pace, after the second re-planned at the second's pace, and "
        "training stops at the budget in any case",
    )
    batch_size: int = Field(
        64,
        ge=2,
        description="pairs per step; each pair's other pairs in the batch are its negatives",
    )
    learning_rate: float = Field(
        4e-3,
        gt=0,
        description="peak learning rate of the image tower trained from scratch (locked-text path)",
    )
    clip_learning_rate: float = Field(
        1e-5, gt=0, description="peak learning rate when fine-tuning a CLIP model"
    )
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW weight decay (not on norms, biases or the temperature)"
    )
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up"
    )
    initial_temperature: float = Field(
        0.07,
        gt=0,
        le=1,
        description="starting softmax temperature of the contrastive loss (learned from there; CLIP's 0.07)",
    )
    augment: bool = Field(
        True,
        description="random flips, small zoom/shift and mild brightness/contrast changes "
        "(never hue: colour is what queries ask for)",
    )
    extra_caption_templates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTRA_CAPTION_TEMPLATES),
        description="more captions per product from other field templates; each step pairs an image with one "
        "of its captions at random (text augmentation); default: the attributes without the product name "
        "(fields of the default caption template; none: [] in a --config file)",
    )
    batch_clusters: int = Field(
        0,
        ge=0,
        description="locked-text path: 0 draws batches at random; k > 0 groups the "
        "captions into k clusters (k-means on their text vectors) and "
        "builds each batch from 4 clusters, so negatives are similar "
        "products (topic-aware sampling, as TAS-B)",
    )
    tower_width: int = Field(
        32,
        ge=4,
        le=512,
        description="channels of the image tower's first stage (doubled at each of its four stages)",
    )
    tower_blocks: list[int] = Field(
        default_factory=lambda: [1, 1, 1, 1],
        min_length=1,
        max_length=6,
        description="residual blocks per stage of the image tower",
    )
    freeze_text: bool = Field(False, description="CLIP path: keep the text tower's weights fixed")
    freeze_image: bool = Field(False, description="CLIP path: keep the image tower's weights fixed")
    wise_ft_ratio: float = Field(
        0.5,
        ge=0,
        le=1,
        description="CLIP path: weight of the fine-tuned weights when "
        "interpolating with the zero-shot ones (WiSE-FT); 1 keeps "
        "the fine-tuned model, 0 the zero-shot one",
    )
    mixed_precision: bool = Field(
        True, description="bfloat16 autocast when training on a GPU; always off on CPU"
    )
    checkpoint_every: int = Field(
        200, ge=1, description="steps between checkpoints (also written at each epoch's end)"
    )
    seed: int = Field(0, description="seed of initialisation, batch order and augmentations")
    processes: int = processes_field(" (the loss over every process's embeddings)")

    def key_settings(self) -> dict[str, Any]:
        """The settings that decide the trained model (a stage key's part): not how many processes ran."""
        return self.model_dump(mode="json", exclude={"processes"})


@dataclass
class TrainResult:
    """What a training run did: loss curve, how far it got, how fast."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    epochs_planned: int = 0
    epochs_done: float = 0.0
    steps_per_epoch: int = 0
    seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    images_per_second: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the process while training: what the run costs without contention
    stopped_by_budget: bool = False
    # each change of the plan by the budget: {"after_epochs", "elapsed_seconds", "epochs"}
    replans: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int = 0
    final_temperature: float = 0.0
    device: str = "cpu"
    mixed_precision: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loss_by_epoch(self) -> list[float]:
        per = max(self.steps_per_epoch, 1)
        return [float(np.mean(self.losses[i : i + per])) for i in range(0, len(self.losses), per)]
