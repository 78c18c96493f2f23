"""Image/text contrastive training on a catalog's own pairs (no labels), with no Prefect inside.

Two paths, one loop:

* :func:`train_lit`: locked-text tuning (LiT, Zhai et al. 2022, with the *text* side locked): the
  text tower (a sentence-transformers model, by default the bundled all-MiniLM-L6-v2) is frozen and
  its caption embeddings are computed once; a small image tower is trained from scratch into that
  embedding space with a symmetric contrastive loss and a learnable temperature. Needs no
  pretrained vision weights. Written by hand because no library trains an image tower against
  fixed text vectors: sentence-transformers' image support and open_clip both expect pretrained
  towers on both sides and re-encode the text every step, which on this CPU costs ~50x the step.
* :func:`train_clip`: fine-tuning a transformers ``CLIPModel`` (e.g. openai/clip-vit-base-patch32
  or a directory), whose forward pass with ``return_loss=True`` is the symmetric contrastive loss
  with its learnable ``logit_scale``; either tower can be frozen; the result is interpolated with
  the zero-shot weights (WiSE-FT, Wortsman et al. 2022) to keep general knowledge.

The loop is shared: a fixed permutation per epoch and a seeded generator per step (augmentations),
so a run resumed from its checkpoint continues exactly as if it had never stopped; a cosine
schedule with warm-up (transformers' ``get_cosine_schedule_with_warmup``); checkpoints written
atomically every ``checkpoint_every`` steps and at each epoch's end; a training-time budget that
shortens the plan after the first epoch when all epochs would not fit, and re-plans once more after
the second at the second's pace (the first epoch can run slower than the rest, which planned too few
epochs and left the budget unused); mixed precision only on a GPU (always off on CPU). Written by
hand rather than with transformers' ``Trainer`` because the LiT step is not a ``PreTrainedModel``
forward, and the time budget must re-plan the schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MAX_LOGIT_SCALE = 100.0  # as CLIP: the temperature never goes below 0.01


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

    model_config = ConfigDict(extra="forbid")

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
        "training stops at the budget in any case (default: a 45-minute allowance less a margin; "
        "on 2 CPU cores about 47-50 epochs of the ~13k-product fashion catalog fit it)",
    )
    batch_size: int = Field(
        64,
        ge=2,
        description="pairs per step; each pair's other pairs in the batch are its negatives (on the fashion "
        "validation slice 64 beat 128, 256 and 512 at the same cost per epoch: more, smaller steps)",
    )
    learning_rate: float = Field(
        4e-3,
        gt=0,
        description="peak learning rate of the image tower trained from scratch (locked-text path; on the "
        "fashion validation slice 4e-3 beat 2e-3 and 1e-3)",
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


# ------------------------------------------------------------------------------------ the shared loop


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Keep freed memory in the process heap while training (glibc only; elsewhere a no-op).

    glibc hands every block over 32 MB (a batch's activations) back to the kernel when freed and
    maps it again on the next step; on this 2-core machine the page faults cost a fifth of a step
    (13.8 s of system time vs 1.4 s per 8 steps, measured). ``mallopt`` turns that off for the run.
    """
    import ctypes
    import ctypes.util

    m_trim_threshold, m_mmap_max = -1, -4
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        yield
        return
    changed = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    try:
        yield
    finally:
        if changed:  # glibc's defaults
            mallopt(m_mmap_max, 65536)
            mallopt(m_trim_threshold, 128 * 1024)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _weight_decay_groups(
    named_params: Sequence[tuple[str, Any]], weight_decay: float
) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epochs_that_fit(
    most: int, done: int, elapsed_seconds: float, epoch_seconds: float, budget_seconds: float
) -> int:
    """How many epochs to plan after ``done`` of them took ``elapsed_seconds``, when each further one
    takes ``epoch_seconds``: the ``most`` asked for if they fit the budget, else as many as fit (at
    least those done)."""
    further = int(max(budget_seconds - elapsed_seconds, 0.0) // max(epoch_seconds, 1e-9))
    return max(done, min(most, done + further))


def epoch_order(
    n_pairs: int, seed: int, epoch: int, clusters: np.ndarray | None = None, chunk: int = 64
) -> np.ndarray:
    """The order products are visited in one epoch; consecutive batch-size slices are the batches.

    Random, or with ``clusters``: each cluster shuffled and cut into chunks of ``chunk`` products,
    the chunks shuffled, so each batch holds a few clusters' worth of similar products. Depends only
    on (seed, epoch): a resumed run visits the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    if clusters is None:
        return rng.permutation(n_pairs)
    pieces = []
    for cluster in np.unique(clusters):
        members = rng.permutation(np.flatnonzero(clusters == cluster))
        pieces += [members[i : i + chunk] for i in range(0, len(members), chunk)]
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))])


def caption_clusters(text_vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster id per caption: k-means (FAISS) on unit text vectors, seeded."""
    import faiss

    k = max(1, min(k, len(text_vectors) // 4))
    kmeans = faiss.Kmeans(text_vectors.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
    vectors = np.ascontiguousarray(text_vectors, dtype=np.float32)
    kmeans.train(vectors)
    return kmeans.index.search(vectors, 1)[1][:, 0].astype(np.int64)


def _run_loop(
    *,
    n_pairs: int,
    config: ClipTrainConfig,
    modules: dict[str, Any],
    optimizer: Any,
    peak_lr: float,
    loss_for_batch: Callable[[np.ndarray, Any], Any],
    run_key: str,
    checkpoint_dir: str | Path | None,
    show_progress: bool,
    on_step: Callable[[int, float], None] | None,
    device: str,
    mixed_precision: bool,
    clusters: np.ndarray | None = None,
) -> TrainResult:
    """Epochs of ``loss_for_batch(indices, generator)`` steps with schedule, checkpoints and budget."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    batch_size = min(config.batch_size, n_pairs)
    steps_per_epoch = max(
        1, n_pairs // batch_size
    )  # drop the ragged last batch: every step sees a full batch
    plan = {"epochs": config.epochs}

    def schedule(last_step: int = -1):
        total = plan["epochs"] * steps_per_epoch
        warmup = int(config.warmup_fraction * total)
        return get_cosine_schedule_with_warmup(optimizer, warmup, total, last_epoch=last_step)

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", peak_lr)
    scheduler = schedule()
    result = TrainResult(
        steps_per_epoch=steps_per_epoch,
        epochs_planned=config.epochs,
        device=device,
        mixed_precision=mixed_precision,
    )
    global_step, spent, spent_cpu = 0, 0.0, 0.0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("run_key") == run_key:
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
            plan["epochs"] = int(state["planned_epochs"])
            scheduler = schedule(int(state["global_step"]) - 1)
            scheduler.load_state_dict(state["scheduler"])
            global_step, spent = int(state["global_step"]), float(state["seconds"])
            spent_cpu = float(state.get("cpu_seconds", 0.0))
            result.losses = [float(x) for x in state["losses"]]
            result.resumed_from_step = global_step
            log.info("resuming training from %s at step %d", checkpoint, global_step)
        else:
            log.warning(
                "ignoring checkpoint %s: it belongs to another run (data or settings changed)", checkpoint
            )

    def save_checkpoint() -> None:
        if checkpoint is None:
            return
        _atomic_torch_save(
            {
                "run_key": run_key,
                "modules": {name: module.state_dict() for name, module in modules.items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "global_step": global_step,
                "planned_epochs": plan["epochs"],
                "seconds": spent + (time.time() - started),
                "cpu_seconds": spent_cpu + (time.process_time() - cpu_started),
                "losses": result.losses,
            },
            checkpoint,
        )

    started, cpu_started = time.time(), time.process_time()
    budget = config.max_train_minutes * 60.0
    first_epoch_end: float | None = None  # elapsed seconds at the end of the first epoch, if timed here
    for module in modules.values():
        module.train()

    def autocast():
        if mixed_precision:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return torch.autocast(device_type="cpu", enabled=False)

    progress = tqdm(
        total=plan["epochs"] * steps_per_epoch,
        initial=global_step,
        desc="training",
        unit="step",
        disable=not show_progress,
        mininterval=5.0,
    )
    with keep_freed_memory():
        order_of: dict[int, np.ndarray] = {}
        while global_step < plan["epochs"] * steps_per_epoch:
            epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
            if epoch not in order_of:
                order_of = {
                    epoch: epoch_order(n_pairs, config.seed, epoch, clusters, max(1, batch_size // 4))
                }
            order = order_of[epoch]
            indices = np.sort(order[step_in_epoch * batch_size : (step_in_epoch + 1) * batch_size])
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + global_step)
            with autocast():
                loss = loss_for_batch(indices, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            result.losses.append(float(loss.detach()))
            progress.update(1)
            progress.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
            elapsed = spent + (time.time() - started)
            end_of_epoch = global_step % steps_per_epoch == 0
            if end_of_epoch and global_step == steps_per_epoch:
                first_epoch_end = elapsed
                fits = epochs_that_fit(config.epochs, 1, elapsed, elapsed, budget)
            elif end_of_epoch and global_step == 2 * steps_per_epoch and first_epoch_end is not None:
                # the first epoch can run slower than the rest: plan again at the second one's pace
                # (only when this process timed both; a run resumed in between keeps its plan)
                fits = epochs_that_fit(config.epochs, 2, elapsed, elapsed - first_epoch_end, budget)
            else:
                fits = plan["epochs"]
            if fits != plan["epochs"] and global_step < plan["epochs"] * steps_per_epoch:
                log.warning(
                    "%d epoch(s) took %.0f s: %d of at most %d epochs fit the %.0f-minute budget (planned: %d); "
                    "re-planning the schedule",
                    global_step // steps_per_epoch,
                    elapsed,
                    fits,
                    config.epochs,
                    config.max_train_minutes,
                    plan["epochs"],
                )
                plan["epochs"] = fits
                result.replans.append(
                    {"after_epochs": global_step // steps_per_epoch, "elapsed_seconds": round(elapsed, 1),
                     "epochs": fits}
                )
                scheduler = schedule(global_step - 1)
                progress.total = plan["epochs"] * steps_per_epoch
                progress.refresh()
            if end_of_epoch or global_step % config.checkpoint_every == 0:
                save_checkpoint()
            if on_step is not None:
                on_step(global_step, result.losses[-1])
            if elapsed > budget and global_step < plan["epochs"] * steps_per_epoch:
                log.warning(
                    "training stopped by the %.0f-minute budget at step %d of %d",
                    config.max_train_minutes,
                    global_step,
                    plan["epochs"] * steps_per_epoch,
                )
                result.stopped_by_budget = True
                save_checkpoint()
                break
    progress.close()
    for module in modules.values():
        module.eval()
    result.steps = global_step
    result.epochs_planned = plan["epochs"]
    result.epochs_done = round(global_step / steps_per_epoch, 3)
    result.seconds = round(spent + (time.time() - started), 2)
    result.cpu_seconds = round(spent_cpu + (time.process_time() - cpu_started), 2)
    result.seconds_per_epoch = round(result.seconds / max(result.epochs_done, 1e-9), 2)
    result.images_per_second = round(global_step * batch_size / max(result.seconds, 1e-9), 1)
    return result


# ------------------------------------------------------------------------------------ locked text (LiT)


def caption_groups(captions: Sequence[str]) -> np.ndarray:
    """Group id per caption: identical captions share one (they are not each other's negatives)."""
    import pandas as pd

    return pd.factorize(pd.Series(list(captions)))[0].astype(np.int64)


def contrastive_targets(groups: Any) -> Any:
    """Row-normalised "same caption" matrix: the soft targets of the symmetric contrastive loss.

    With distinct captions it is the identity (standard CLIP/LiT targets); two products with the
    same caption (e.g. "Titan Men Black Watch") share the probability instead of being pushed apart.
    """
    same = (groups[:, None] == groups[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


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
    """Train ``encoder.tower`` (a :class:`tasks.image_text.LitEncoder`) in place against fixed text vectors.

    ``pixels``: uint8 (N, height, width, 3); ``text_embeddings``: unit-length (N, dim) from the
    frozen text tower for the same N products, or (V, N, dim) for V captions per product (each
    step picks one per pair at random); ``captions`` (N or V x N strings) marks identical captions.
    """
    import torch
    from torch.nn import functional as F

    from tasks.image_tower import augment_batch

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
    optimizer = torch.optim.AdamW(_weight_decay_groups(named, config.weight_decay), lr=config.learning_rate)
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
        image_emb = F.normalize(tower(inputs), dim=-1)
        scale = logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()
        logits = scale * image_emb @ texts[view, index].T
        targets = contrastive_targets(group_of[view, index])
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    clusters = (
        caption_clusters(views[0], config.batch_clusters, config.seed) if config.batch_clusters else None
    )
    result = _run_loop(
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


# ------------------------------------------------------------------------------------------ CLIPModel


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
    """Fine-tune ``encoder.model`` (a :class:`tasks.image_text.ClipEncoder`) in place, then apply WiSE-FT.

    ``captions``: one per image, or V lists of them (each step picks one per pair at random).
    """
    import torch

    from tasks.image_tower import augment_batch

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
        _weight_decay_groups(list(model.named_parameters()), config.weight_decay),
        lr=config.clip_learning_rate,
    )

    def loss_for_batch(indices: np.ndarray, generator: Any) -> Any:
        batch = torch.from_numpy(np.ascontiguousarray(pixels[indices]))
        if config.augment:
            batch = (augment_batch(batch, generator) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        chosen = (
            torch.randint(len(views), (len(indices),), generator=generator).tolist()
            if len(views) > 1
            else [0] * len(indices)
        )
        text = encoder.text_inputs([views[v][i] for v, i in zip(chosen, indices, strict=True)])
        image = encoder.image_inputs(batch.numpy())
        inputs = {k: v.to(device) for k, v in {**text, **image}.items()}
        model.logit_scale.data.clamp_(max=math.log(MAX_LOGIT_SCALE))
        return model(**inputs, return_loss=True).loss

    result = _run_loop(
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


# ------------------------------------------------------------------------------------- one entry point


def tower_config(config: ClipTrainConfig, image_size: tuple[int, int]) -> Any:
    """The image tower's shape from the training settings: one stage per entry of ``tower_blocks``,
    ``tower_width`` channels doubling at each stage (the embedding size follows the text tower)."""
    from tasks.image_tower import ImageTowerConfig

    blocks = tuple(config.tower_blocks)
    return ImageTowerConfig(
        image_size=tuple(image_size),
        blocks=blocks,
        widths=tuple(config.tower_width * 2**i for i in range(len(blocks))),
    )


def caption_views(pairs: Any, extra_templates: Sequence[str]) -> list[list[str]]:
    """The pairs' captions, then one more caption per product for each extra template (a product
    whose fields leave an extra template empty keeps its main caption there)."""
    from tasks.pairs import render_caption, template_fields

    views = [list(pairs.captions)]
    attributes = pairs.attributes() if extra_templates else []
    for template in extra_templates:
        missing = [f for f in template_fields(template) if attributes and f not in attributes[0]]
        if missing:
            raise ValueError(
                f"extra caption template {template!r} names field(s) {missing} that are not catalog "
                f"fields; fields: {sorted(attributes[0])}"
            )
        views.append(
            [
                render_caption(template, values) or caption
                for values, caption in zip(attributes, pairs.captions, strict=True)
            ]
        )
    return views


def train_catalog_encoder(
    model: str | Path,
    pairs: Any,
    config: ClipTrainConfig,
    output_dir: str | Path,
    *,
    image_size: tuple[int, int] = (80, 60),
    workspace: str | Path | None = None,
    run_key: str = "catalog-encoder",
    checkpoint_dir: str | Path | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    card: dict[str, Any] | None = None,
) -> tuple[Path, TrainResult]:
    """Train an image/text encoder on a catalog's pairs (a :class:`tasks.pairs.Pairs`) and save it.

    Which path follows from ``model`` (see :func:`tasks.image_text.initial_encoder`): a text model or saved locked-
    text encoder trains an image tower against the frozen text tower's caption vectors (cached in
    ``workspace``); a CLIP model is fine-tuned. The saved directory loads back with
    :func:`tasks.image_text.load_catalog_encoder`.
    """

    from tasks.image_text import LitEncoder, cached_text_embeddings, initial_encoder

    encoder = initial_encoder(model, tower_config(config, image_size), seed=config.seed)
    if isinstance(encoder, LitEncoder):
        if tuple(pairs.pixels.shape[1:3]) != tuple(encoder.image_size):
            raise ValueError(
                f"pairs hold {pairs.pixels.shape[1]}x{pairs.pixels.shape[2]} images but the image tower "
                f"takes {encoder.image_size[0]}x{encoder.image_size[1]}"
            )
        captions = caption_views(pairs, config.extra_caption_templates)
        text_vectors = np.stack(
            [
                cached_text_embeddings(encoder, view, workspace, show_progress=show_progress)
                for view in captions
            ]
        )
        result = train_lit(
            encoder,
            pairs.pixels,
            text_vectors,
            config,
            captions=captions,
            run_key=run_key,
            checkpoint_dir=checkpoint_dir,
            show_progress=show_progress,
            on_step=on_step,
        )
        path = "locked-text (LiT): frozen text tower, image tower trained from scratch"
    else:
        result = train_clip(
            encoder,
            pairs.pixels,
            caption_views(pairs, config.extra_caption_templates),
            config,
            run_key=run_key,
            checkpoint_dir=checkpoint_dir,
            show_progress=show_progress,
            on_step=on_step,
        )
        path = f"CLIP fine-tuning, WiSE-FT ratio {config.wise_ft_ratio}"
    trained = {
        "from": str(model),
        "path": path,
        "pairs": len(pairs),
        "settings": config.model_dump(mode="json"),
        "result": {k: v for k, v in result.to_dict().items() if k != "losses"},
        **(card or {}),
    }
    saved = encoder.save(output_dir, extra={"trained": trained})
    return saved, result


TRAIN_STAGE = "clip-train"
MODEL_SUBDIR = "model"
RESULT_FILE = "train.json"


def train_stage(
    model: str | Path,
    pairs_path: str | Path,
    config: ClipTrainConfig,
    *,
    holdout_fraction: float,
    split_salt: str = "holdout",
    image_size: tuple[int, int] = (80, 60),
    workspace: str | Path,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train on the non-held-out products of a committed pairs stage; the stage output (model,
    ``train.json``, loss plot) lives at ``<workspace>/clip-train/<key>/``, keyed by the model's
    fingerprint, the training pairs and the settings. A finished stage is reused; an interrupted
    one resumes from its checkpoint. Returns paths and small metadata (what a Prefect task passes)."""
    import json

    from tasks.models import resolve_model
    from tasks.pairs import load_pairs, split_pairs
    from tasks.report import plot_series
    from tasks.store import stage_key, write_json_atomic

    pairs = load_pairs(pairs_path)
    train_pairs, held_out = split_pairs(pairs, holdout_fraction, salt=split_salt)
    if len(train_pairs) < 2:
        raise ValueError(
            f"only {len(train_pairs)} product(s) left to train on after holding out "
            f"{len(held_out)}; lower the held-out fraction or add products"
        )
    settings = {"train": config.model_dump(mode="json"), "image_size": list(image_size)}
    key = stage_key(
        TRAIN_STAGE, settings, inputs=[train_pairs.key], models=[resolve_model(model).fingerprint]
    )
    folder = Path(workspace) / TRAIN_STAGE / key
    model_dir, result_file = folder / MODEL_SUBDIR, folder / RESULT_FILE
    if result_file.is_file() and model_dir.is_dir():
        log.info("reusing the trained model at %s (same model, pairs and settings)", model_dir)
        return {**json.loads(result_file.read_text()), "reused": True}
    saved, result = train_catalog_encoder(
        model,
        train_pairs,
        config,
        model_dir,
        image_size=image_size,
        workspace=workspace,
        run_key=key,
        checkpoint_dir=folder,
        show_progress=show_progress,
        on_step=on_step,
        card={"pairs_key": train_pairs.key, "held_out_products": len(held_out)},
    )
    curve = [(i / result.steps_per_epoch, loss) for i, loss in enumerate(result.losses, start=1)]
    plot = plot_series(
        {"contrastive loss": curve}, folder / "loss.png", title="training loss", xlabel="epoch", ylabel="loss"
    )
    summary = {
        "model_dir": str(saved),
        "key": key,
        "loss_plot": str(plot),
        "trained_on": len(train_pairs),
        "held_out": len(held_out),
        "result": result.to_dict(),
    }
    write_json_atomic(result_file, summary)  # written last: its presence means the stage is complete
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return {**summary, "reused": False}
