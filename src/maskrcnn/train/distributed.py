"""Several processes training one model: ``torch.distributed``, as ``torchrun`` sets it up.

``torchrun --nproc_per_node=N -m maskrcnn train CONFIG ...`` starts N processes with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment (on
several nodes too, through its rendezvous flags). ``process_group`` joins them: NCCL on CUDA,
one GPU per process (``cuda:LOCAL_RANK``), Gloo on the CPU. Gradients are averaged by
``DistributedDataParallel`` (``wrap``); the few decisions that must be the same in every
process (stop, fit the schedule, keep the best) go through the collectives below.

Outside torchrun every function here is what one process alone does: rank 0 of 1, nothing
sent, values returned as given.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun (or a launcher that sets the same variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def rank() -> int:
    """This process's rank (0 is the one that writes and shows), also before ``process_group``."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def _joined() -> bool:
    # torchrun with one process joins too: the same code runs as with several (NCCL, DDP).
    return dist.is_initialized()


def resolve_device(name: str) -> torch.device:
    """``device`` of the config for this process: "auto" is CUDA where there is one; under
    torchrun a CUDA device is this process's own, ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    if device.type == "cuda" and launched():
        if device.index is not None:
            raise ConfigError(
                f"device={name} names one GPU, but under torchrun each process takes its own "
                "(cuda:LOCAL_RANK); use device=cuda or device=auto (CUDA_VISIBLE_DEVICES picks the GPUs)"
            )
        local, count = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= count:
            raise ConfigError(
                f"LOCAL_RANK {local} but this node has {count} CUDA device(s): "
                "torchrun's --nproc_per_node must not exceed the GPUs of a node"
            )
        device = torch.device("cuda", local)
    return device


@contextlib.contextmanager
def process_group(device: torch.device, timeout_minutes: float = 10.0) -> Iterator[None]:
    """Join torchrun's processes for the block (NCCL for CUDA, Gloo for the CPU) and leave
    after it. Does nothing outside torchrun, or when the caller has joined already.

    ``timeout_minutes``: how long a collective waits for a process that stopped answering
    before it fails (torch's default is 30 minutes for Gloo, 10 for NCCL; one value for both).
    """
    if not launched() or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its gradients averaged over the processes (``DistributedDataParallel``),
    or ``model`` itself in a single process. Wrap again whenever the set of trainable
    parameters changes (a new stage). Every parameter that trains takes part in every step's
    loss (zero-weighted where a batch has nothing for it), so DDP needs no search for unused
    parameters and never waits for a gradient that does not come."""
    if not _joined():
        return model
    # The convolutions run channels-last (NHWC), so their weight gradients come out so; DDP's
    # gradient buckets take the weights' layout, and a mismatch costs a copy per step.
    model.to(memory_format=torch.channels_last)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true in any process."""
    if not _joined():
        return flags
    t = torch.tensor([int(f) for f in flags], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean(value: float) -> float:
    """The mean of ``value`` over the processes."""
    if not _joined():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def all_gather(obj: T) -> list[T]:
    """``obj`` of every process, in rank order (pickled; for small things)."""
    if not _joined():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather(obj: T) -> list[T] | None:
    """``obj`` of every process, in rank order, in process 0; None elsewhere."""
    if not _joined():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_first(obj: T) -> T:
    """Process 0's ``obj``, in every process."""
    if not _joined():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(model: nn.Module) -> None:
    """Process 0's buffers (BatchNorm statistics) in every process. DDP sends them before each
    training forward, so after a step they differ by that step's update; validation and
    checkpoints must see one model."""
    if _joined():
        for b in model.buffers():
            dist.broadcast(b, src=0)


def shard(items: list[T]) -> list[T]:
    """This process's contiguous share of ``items``: every item in exactly one process, shares
    differing in length by at most one (nothing padded, so nothing counted twice)."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w : (r + 1) * n // w]


@contextlib.contextmanager
def first_rank_first() -> Iterator[None]:
    """Process 0 runs the block alone (say, writing a dataset), then the others run it."""
    if _joined() and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if _joined() and dist.get_rank() == 0:
            dist.barrier()


def exit_process(code: int) -> NoReturn:
    """Leave a torchrun process at once with ``code``, after flushing the logs and streams,
    without the interpreter's teardown.

    Gloo's threads, torn down as the interpreter exits, have aborted processes whose run had
    finished and written everything (SIGABRT, "terminate called without an active exception",
    twice in CI, not reproducible on demand); torchrun then reports a completed run as failed.
    Every file the trainer writes is closed before it returns, so nothing is lost by skipping
    the teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
