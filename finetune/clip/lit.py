"""Locked-text tuning (LiT, Zhai et al. 2022, with the *text* side locked).

The text tower (a sentence-transformers model, by default the bundled all-MiniLM-L6-v2) is frozen
and its caption embeddings are computed once; a small image tower is trained from scratch into
that embedding space with a symmetric contrastive loss and a learnable temperature. Needs no
pretrained vision weights. Written by hand because no library trains an image tower against fixed
text vectors: sentence-transformers' image support and open_clip both expect pretrained towers on
both sides and re-encode the text every step, which on this CPU costs ~50x the step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.clip.config import ClipTrainConfig, TrainResult
from finetune.clip.loop import (
    MAX_LOGIT_SCALE,
    caption_clusters,
    caption_groups,
    contrastive_targets,
    gathered_order,
    run_loop,
    weight_decay_groups,
)
from finetune.distributed import gather_with_grad

log = logging.getLogger(__name__)


def train_lit(
    encoder: Any,
    pixels: np.ndarray,
    text_embeddings: np.ndarray,
    config: ClipTrainConfig,
    *,
    captions: Sequence[str] | Sequence[Sequence[str]] | None = None,
    run_key: str = "lit",
    checkpoint_dir: str | Path | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``encoder.tower`` (a :class:`tasks.catalog.encoders.LitEncoder`) in place against fixed text vectors.

    ``pixels``: uint8 (N, height, width, 3); ``text_embeddings``: unit-length (N, dim) from the
    frozen text tower for the same N products, or (V, N, dim) for V captions per product (each
    step picks one per pair at random); ``captions`` (N or V x N strings) marks identical captions.
    """
    import torch
    from torch.nn import functional as F

    from tasks.catalog.image_tower import augment_batch

    views = np.asarray(text_embeddings, dtype=np.float32)
    views = views[None] if views.ndim == 2 else views
    if views.shape[1] != len(pixels):
        raise ValueError(f"{len(pixels)} images but {views.shape[1]} text embeddings")
    if len(pixels) < 2:
        raise ValueError("contrastive training needs at least 2 pairs")
    torch.manual_seed(config.seed)
    tower = encoder.tower
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / config.initial_temperature)))
    scale_holder = torch.nn.ParameterDict({"logit_scale": logit_scale})
    named = list(tower.named_parameters()) + [("logit_scale", logit_scale)]
    optimizer = torch.optim.AdamW(weight_decay_groups(named, config.weight_decay), lr=config.learning_rate)
    n_views = views.shape[0]
    texts = torch.from_numpy(np.ascontiguousarray(views))
    if captions is None:
        group_ids = np.arange(n_views * len(pixels)).reshape(n_views, len(pixels))
    else:
        nested = (
            [list(captions)] if n_views == 1 and isinstance(captions[0], str) else [list(c) for c in captions]
        )
        group_ids = caption_groups([c for view in nested for c in view]).reshape(n_views, len(pixels))
    group_of = torch.from_numpy(group_ids)
    images = torch.from_numpy(np.ascontiguousarray(pixels))

    def loss_for_batch(indices: np.ndarray, generator: Any) -> Any:
        index = torch.from_numpy(indices)
        batch = images[index]
        inputs = augment_batch(batch, generator) if config.augment else batch
        # one of each pair's captions (always the first with a single view)
        view = (
            torch.randint(n_views, (len(index),), generator=generator)
            if n_views > 1
            else torch.zeros_like(index)
        )
        # this process's images; every process's image rows for the loss, texts in the same order
        mine, order = gathered_order(len(index))
        image_emb = gather_with_grad(F.normalize(tower(inputs[torch.from_numpy(mine)]), dim=-1))
        rows, chosen = index[torch.from_numpy(order)], view[torch.from_numpy(order)]
        scale = logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
        logits = scale * image_emb @ texts[chosen, rows].T
        targets = contrastive_targets(group_of[chosen, rows])
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    clusters = (
        caption_clusters(views[0], config.batch_clusters, config.seed) if config.batch_clusters else None
    )
    result = run_loop(
        n_pairs=len(pixels),
        config=config,
        modules={"tower": tower, "scale": scale_holder},
        optimizer=optimizer,
        peak_lr=config.learning_rate,
        loss_for_batch=loss_for_batch,
        run_key=run_key,
        checkpoint_dir=checkpoint_dir,
        show_progress=show_progress,
        on_step=on_step,
        device="cpu",
        mixed_precision=False,
        clusters=clusters,
    )
    final_scale = float(logit_scale.detach().clamp(max=math.log(MAX_LOGIT_SCALE)).exp())
    encoder.logit_scale = final_scale
    result.final_temperature = round(1.0 / final_scale, 5)
    return result
