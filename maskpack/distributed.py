"""Multi-process training with PyTorch's own engine (``torchrun`` + DistributedDataParallel).

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
:func:`init` joins that process group (``env://`` rendezvous): NCCL when training on CUDA (the
device is ``cuda:LOCAL_RANK``), gloo on the CPU. Without those variables everything here is a
no-op on one process, so single-process code paths call these helpers unconditionally.

The helpers are small on purpose: DDP itself averages the gradients; what is left is the
handful of collectives the trainer needs beyond it (Sinkhorn sums, metric sums, gathering
evaluation features, broadcasting the metrics rank 0 computed). None of them pickle: only
tensors travel.

Example (two processes on one machine)::

    torchrun --nproc-per-node 2 -m maskpack train --dataset digits --out runs/ddp
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    node, and the process-group ``backend`` (None on one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True when this process was started by ``torchrun`` (its environment variables are set)."""
    return all(k in os.environ for k in _ENV)


def info() -> DistInfo:
    """The current process group's view (rank 0 of 1 when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                    str(dist.get_backend()))


def init(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (once per process) and pick this rank's device.

    Args:
        device: the resolved training device (``cpu`` or ``cuda``); on CUDA each rank takes
            ``cuda:LOCAL_RANK`` and the backend is NCCL, on the CPU it is gloo.

    Returns:
        ``(DistInfo, device)``; ``(DistInfo(), device)`` unchanged when not launched by torchrun.

    Raises:
        ConfigError: more local ranks than visible GPUs.
    """
    if not launched() or (int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized()):
        return DistInfo(), device
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible: "
                              "use --nproc-per-node at most the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", **kw)
        atexit.register(cleanup)
    got = info()
    if (got.backend == "nccl") != (device.type == "cuda"):
        raise ConfigError(f"the process group uses {got.backend} but training runs on {device}: "
                          "use one device type for all runs of this process")
    return got, device


def cleanup() -> None:
    """Leave the process group (safe to call twice or without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if info().enabled:
        dist.barrier()


def is_main() -> bool:
    """True on rank 0 (and on a single process): the one rank that writes files and prints."""
    return info().is_main


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones via the host).
    if info().backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device if t.device.type == "cpu" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks, as a new tensor on ``t``'s device.

    ``t`` itself is not changed (Sinkhorn divides by the returned sums).
    """
    if not info().enabled:
        return t
    buf = t.detach().to(_comm_device(t), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_max(value: int) -> int:
    """The largest of an integer over all ranks."""
    if not info().enabled:
        return value
    buf = torch.tensor([value], dtype=torch.long, device=_comm_device(torch.zeros(())))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every rank with rank ``src``'s values (in place; returns ``t``)."""
    if not info().enabled:
        return t
    buf = t.detach().to(_comm_device(t), copy=True)
    dist.broadcast(buf, src)
    with torch.no_grad():
        t.copy_(buf.to(t.device))
    return t


def broadcast_floats(values: dict[str, float] | None, keys: list[str], src: int = 0) -> dict[str, float]:
    """Rank ``src``'s ``{key: float}`` on every rank; every rank passes the same ``keys``."""
    if not info().enabled:
        return dict(values or {})
    vals = torch.tensor([float((values or {}).get(k, 0.0)) for k in keys], dtype=torch.float64)
    broadcast_(vals, src)
    return dict(zip(keys, vals.tolist(), strict=True))


def all_gather_stack(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (same shape on all ranks) stacked by rank: ``(W, ...)`` on the CPU."""
    d = info()
    if not d.enabled:
        return t.detach().cpu()[None]
    buf = t.detach().to(_comm_device(t)).contiguous()
    bufs = [torch.empty_like(buf) for _ in range(d.world_size)]
    dist.all_gather(bufs, buf)
    return torch.stack(bufs).cpu()


def gather_strided(t: torch.Tensor, total: int, *, chunk: int = 4096) -> torch.Tensor:
    """Reassemble rows that ranks computed over strided shards into the original order.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...`` of a ``total``-row result (the shard that
    :class:`maskpack.data.EpochSampler` with ``shuffle=False`` gives it). Every rank gets the
    full ``(total, ...)`` tensor on the CPU. Rows travel in chunks so that a large evaluation
    set (ImageNet features) never needs one huge buffer on the GPU.

    Args:
        t: this rank's rows, shape ``(n_r, ...)`` (CPU or GPU).
        total: rows over all ranks.
        chunk: rows per rank per collective call.
    """
    d = info()
    if not d.enabled:
        return t.cpu()
    w = d.world_size
    per = -(-total // w)  # rows of the largest shard
    trailing = tuple(t.shape[1:])
    if t.dim() == 2:  # an empty shard, (0, 0), does not know the feature width
        trailing = (all_reduce_max(t.shape[1]),)
    dev = _comm_device(t)
    pad = torch.zeros((per, *trailing), dtype=t.dtype, device=dev)
    if t.shape[0]:
        pad[:t.shape[0]] = t.to(dev)
    parts = []
    for i in range(0, per, chunk):
        piece = pad[i:i + chunk].contiguous()
        bufs = [torch.empty_like(piece) for _ in range(w)]
        dist.all_gather(bufs, piece)
        parts.append(torch.stack(bufs, dim=1).cpu())  # (rows, W, ...): row j of rank r is j*W + r
    out = torch.cat(parts) if parts else torch.zeros((0, w, *trailing), dtype=t.dtype)
    return out.reshape(-1, *trailing)[:total]


def check_batch(global_batch: int, world_size: int) -> int:
    """The per-device batch for a global ``--batch-size``; it must split evenly."""
    if global_batch % world_size:
        lo = global_batch - global_batch % world_size
        raise ConfigError(f"--batch-size {global_batch} is the global batch and must be a multiple of "
                          f"the {world_size} processes: use {lo or world_size} or {lo + world_size}")
    per = global_batch // world_size
    if per < 2 and world_size > 1:
        raise ConfigError(f"--batch-size {global_batch} over {world_size} processes leaves {per} image "
                          "per device; BatchNorm needs at least 2: raise --batch-size")
    return per
