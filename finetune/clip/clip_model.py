"""Fine-tuning a transformers ``CLIPModel`` on a catalog's pairs, then WiSE-FT.

The model's forward pass with ``return_loss=True`` is the symmetric contrastive loss with its
learnable ``logit_scale``; either tower can be frozen; the result is interpolated with the
zero-shot weights (WiSE-FT, Wortsman et al. 2022) to keep general knowledge.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.clip.config import ClipTrainConfig, TrainResult
from finetune.clip.loop import MAX_LOGIT_SCALE, gathered_order, run_loop, weight_decay_groups
from finetune.distributed import gather_with_grad

log = logging.getLogger(__name__)


def wise_ft(zero_shot: dict[str, Any], fine_tuned: dict[str, Any], ratio: float) -> dict[str, Any]:
    """Weight-space ensemble (WiSE-FT): ``(1 - ratio) * zero_shot + ratio * fine_tuned`` per tensor.

    Written by hand: it is one line per tensor, and no library of the stack offers it. Non-float
    tensors (position ids) are taken from the fine-tuned model unchanged.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError("the WiSE-FT ratio must be in [0, 1]")
    if set(zero_shot) != set(fine_tuned):
        raise ValueError("WiSE-FT needs two state dicts of the same architecture")
    merged = {}
    for name, tuned in fine_tuned.items():
        base = zero_shot[name]
        if tuned.is_floating_point():
            merged[name] = (1.0 - ratio) * base.to(tuned.dtype) + ratio * tuned
        else:
            merged[name] = tuned.clone()
    return merged


def set_trainable(model: Any, *, freeze_text: bool, freeze_image: bool) -> None:
    """Freeze the text and/or image tower of a CLIPModel (towers and their projections)."""
    parts = {
        "text_model": freeze_text,
        "text_projection": freeze_text,
        "vision_model": freeze_image,
        "visual_projection": freeze_image,
    }
    for name, frozen in parts.items():
        for param in getattr(model, name).parameters():
            param.requires_grad = not frozen


def train_clip(
    encoder: Any,
    pixels: np.ndarray,
    captions: Sequence[str] | Sequence[Sequence[str]],
    config: ClipTrainConfig,
    *,
    run_key: str = "clip",
    checkpoint_dir: str | Path | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune ``encoder.model`` (a :class:`tasks.catalog.encoders.ClipEncoder`) in place, then apply WiSE-FT.

    ``captions``: one per image, or V lists of them (each step picks one per pair at random).
    """
    import torch
    from torch.nn import functional as F

    from tasks.catalog.image_tower import augment_batch

    if config.freeze_text and config.freeze_image:
        raise ValueError("nothing to train: both towers are frozen (freeze_text and freeze_image)")
    views = [list(captions)] if isinstance(captions[0], str) else [list(c) for c in captions]
    if any(len(view) != len(pixels) for view in views):
        raise ValueError(f"{len(pixels)} images but {[len(v) for v in views]} captions")
    torch.manual_seed(config.seed)
    model = encoder.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixed_precision = bool(config.mixed_precision and device == "cuda")
    zero_shot = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    model.to(device)
    set_trainable(model, freeze_text=config.freeze_text, freeze_image=config.freeze_image)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(list(model.named_parameters()), config.weight_decay),
        lr=config.clip_learning_rate,
    )

    def loss_for_batch(indices: np.ndarray, generator: Any) -> Any:
        # the whole batch's random draws (the same in every process), then this process's share
        batch = torch.from_numpy(np.ascontiguousarray(pixels[indices]))
        if config.augment:
            batch = (augment_batch(batch, generator) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        chosen = (
            torch.randint(len(views), (len(indices),), generator=generator).tolist()
            if len(views) > 1
            else [0] * len(indices)
        )
        mine, _ = gathered_order(len(indices))
        text = encoder.text_inputs([views[chosen[j]][indices[j]] for j in mine])
        image = encoder.image_inputs(batch.numpy()[mine])
        inputs = {k: v.to(device) for k, v in {**text, **image}.items()}
        model.logit_scale.data.clamp_(max=math.log(MAX_LOGIT_SCALE))
        output = model(**inputs)
        # CLIP's symmetric loss over every process's pairs (CLIPModel's own loss sees only its rows)
        images = gather_with_grad(output.image_embeds)
        texts = gather_with_grad(output.text_embeds)
        logits = model.logit_scale.exp() * texts @ images.T
        targets = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    result = run_loop(
        n_pairs=len(pixels),
        config=config,
        modules={"model": model},
        optimizer=optimizer,
        peak_lr=config.clip_learning_rate,
        loss_for_batch=loss_for_batch,
        run_key=run_key,
        checkpoint_dir=checkpoint_dir,
        show_progress=show_progress,
        on_step=on_step,
        device=device,
        mixed_precision=mixed_precision,
    )
    model.to("cpu")
    for param in model.parameters():
        param.requires_grad = True
    if config.wise_ft_ratio < 1.0:
        model.load_state_dict(wise_ft(zero_shot, model.state_dict(), config.wise_ft_ratio))
    model.eval()
    result.final_temperature = round(1.0 / float(model.logit_scale.detach().exp()), 5)
    return result
