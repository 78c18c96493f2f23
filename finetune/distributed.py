"""What training on several processes needs: who this process is, the gather, gradient averaging.

``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` for every process; on CPUs the
processes talk over gloo. MarginMSE and supervised training run on sentence-transformers' trainer,
which does DDP itself under ``torchrun``; the contrastive loop (:mod:`finetune.clip.loop`) uses the
gather and gradient averaging here. Only the first process (rank 0) writes checkpoints and models.
The entry points and their launch from a flow are in :mod:`finetune.launch`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tasks import _env  # noqa: F401


def processes_field(what: str) -> Any:
    """The ``processes`` setting of a training method: how many processes ``torchrun`` starts."""
    from pydantic import Field

    return Field(
        1,
        ge=1,
        le=64,
        description=f"processes to train on (torchrun over gloo), each taking an equal share of every batch{what}; "
        "1: in the flow's process",
    )


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside ``torchrun``."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes (checkpoints, the model, results): rank 0, or the only process."""
    return world()[0] == 0


def ensure_process_group() -> bool:
    """Join ``torchrun``'s process group (gloo: CPUs) once; False when running alone."""
    import torch.distributed as dist

    if world()[1] <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return True


def gather_with_grad(tensor: Any) -> Any:
    """Every process's rows of ``tensor`` concatenated in rank order, the gradient flowing back to each
    process's own rows (torch.distributed.nn's all_gather); ``tensor`` itself when running alone."""
    import torch

    if not ensure_process_group():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def broadcast_parameters(modules: Sequence[Any]) -> None:
    """Make every process start from rank 0's parameters (what DDP's constructor does)."""
    import torch.distributed as dist

    if not ensure_process_group():
        return
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(modules: Sequence[Any]) -> None:
    """Average the gradients over the processes after ``backward`` (DDP's reducer, without its overlap
    of communication and compute). Written by hand because DDP needs every forward to go through its
    wrapper, and the locked-text step is not one module's forward."""
    import torch.distributed as dist

    if not ensure_process_group():
        return
    size = world()[1]
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                param.grad /= size


def local_slice(indices: Any) -> Any:
    """This process's share of a global batch: every world-size-th element from its rank."""
    rank, size = world()
    return indices[rank::size]


def agreed(value: float) -> float:
    """Rank 0's ``value`` in every process (a decision taken on one clock, e.g. a time budget)."""
    import torch
    import torch.distributed as dist

    if not ensure_process_group():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def barrier() -> None:
    import torch.distributed as dist

    if ensure_process_group():
        dist.barrier()
