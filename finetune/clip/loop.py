"""The contrastive training loop shared by the locked-text and the CLIP paths.

A fixed permutation per epoch and a seeded generator per step (augmentations), so a run resumed
from its checkpoint continues exactly as if it had never stopped; a cosine schedule with warm-up
(transformers' ``get_cosine_schedule_with_warmup``); checkpoints written atomically every
``checkpoint_every`` steps and at each epoch's end; a training-time budget that shortens the plan
after the first epoch when all epochs would not fit, and re-plans once more after the second at
the second's pace (the first epoch can run slower than the rest); mixed precision only on a GPU.
Written by hand rather than with transformers' ``Trainer`` because the locked-text step is not a
``PreTrainedModel`` forward, and the time budget must re-plan the schedule.

Identical captions are not each other's negatives (:func:`caption_groups`,
:func:`contrastive_targets`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.clip.config import ClipTrainConfig, TrainResult
from finetune.distributed import (
    agreed,
    average_gradients,
    broadcast_parameters,
    is_main,
    local_slice,
    world,
)
from finetune.guards import check_loss

log = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.pt"


MAX_LOGIT_SCALE = 100.0  # as CLIP: the temperature never goes below 0.01


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


def atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def weight_decay_groups(named_params: Sequence[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
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


def run_loop(
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

    processes = world()[1]
    batch_size = min(config.batch_size, n_pairs)
    # under torchrun every process takes an equal share of each batch (the gather needs equal shapes)
    batch_size = max(processes, batch_size - batch_size % processes)
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

    broadcast_parameters(list(modules.values()))  # every process starts from the same weights

    def save_checkpoint() -> None:
        if checkpoint is None or not is_main():  # one writer; every process reads it to resume
            return
        atomic_torch_save(
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
            check_loss(float(loss.detach()), global_step + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(list(modules.values()))
            optimizer.step()
            scheduler.step()
            global_step += 1
            result.losses.append(float(loss.detach()))
            progress.update(1)
            progress.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
            # rank 0's clock decides the budget and the re-plans, so every process takes the same steps
            elapsed = agreed(spent + (time.time() - started))
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
                    {
                        "after_epochs": global_step // steps_per_epoch,
                        "elapsed_seconds": round(elapsed, 1),
                        "epochs": fits,
                    }
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


def gathered_order(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(this process's positions in a batch of ``n``, the batch's positions in the order the processes'
    rows come back from the gather): one process gets all of it, in order."""
    positions = np.arange(n)
    _, processes = world()
    return local_slice(positions), np.concatenate([positions[r::processes] for r in range(processes)])


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
