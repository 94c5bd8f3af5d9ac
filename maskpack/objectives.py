"""Training objectives: a supervised linear head, and SwAV (self-supervised).

An objective is an ``nn.Module`` holding the trainable tensors that are not part of the
backbone (a head; a projection and prototypes). ``loss(backbone, batch, step)`` returns the
scalar loss and a dict of float statistics. ``task_head()`` is what a saved task keeps as
``TaskModel.head``: the classifier for supervised masks, nothing for SwAV (its projection and
prototypes are training-only).

Example:
    >>> obj = SupervisedObjective(feature_dim=1280, num_classes=10)
    >>> loss, stats = obj.loss(backbone, (images, labels), step=0)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class SupervisedObjective(nn.Module):
    """A new linear head on the backbone's features, trained with cross-entropy."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(feature_dim, num_classes)

    def task_head(self) -> nn.Module | None:
        return self.head

    def loss(self, backbone: nn.Module, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: ARG002
        images, labels = batch
        logits = self.head(backbone(images))  # (N, C)
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, {"train_acc": float(acc)}

    def after_backward(self, step: int) -> None:  # noqa: ARG002
        """Hook between backward and optimizer step (nothing to do here)."""


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, *, epsilon: float = 0.05, iters: int = 3,
             reduce_sum: ReduceFn = _identity, world_size: int = 1) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignments of samples to prototypes (SwAV, Caron et al. 2020).

    Args:
        scores: (B, K) prototype scores of this process's samples.
        epsilon: entropic regularisation; the transport plan is ``exp(scores / epsilon)``.
        iters: normalisation rounds.
        reduce_sum: sums a tensor over all processes in place-free style (identity on one process,
            ``all_reduce`` under DDP), applied to the total and the per-prototype row sums only.
        world_size: number of processes (the global batch is ``B * world_size``).

    Returns:
        (B, K) assignments; each row sums to 1.
    """
    q = torch.exp(scores.float() / epsilon).t()  # (K, B)
    k, b = q.shape[0], q.shape[1] * world_size
    q /= reduce_sum(q.sum())
    for _ in range(iters):
        q /= reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype gets 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample gets 1/B (local: columns live on one rank)
        q /= b
    return (q * b).t()


class SwAVObjective(nn.Module):
    """SwAV: swapped prediction of Sinkhorn codes between multi-crop views.

    Args:
        feature_dim: backbone feature width.
        dim: projection width (paper: 128).
        hidden: width of an MLP hidden layer before the projection (0: linear, as in the paper).
        prototypes: number of L2-normalised prototypes (500).
        temperature: softmax temperature (0.1).
        epsilon, sinkhorn_iters: Sinkhorn settings (0.05, 3).
        n_global: how many crops (the first ones) get codes (2).
        queue_length: feature queue per global crop (0: no queue).
        freeze_prototypes_iters: prototypes get no update for this many steps.
        reduce_sum, world_size: see :func:`sinkhorn` (DDP).
    """

    def __init__(self, feature_dim: int, *, dim: int = 128, hidden: int = 0, prototypes: int = 500,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iters: int = 3,
                 n_global: int = 2, queue_length: int = 0, freeze_prototypes_iters: int = 0,
                 reduce_sum: ReduceFn = _identity, world_size: int = 1):
        super().__init__()
        if hidden:
            self.projection: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, dim))
        else:
            self.projection = nn.Linear(feature_dim, dim)
        self.prototypes = nn.Linear(dim, prototypes, bias=False)
        self.temperature, self.epsilon, self.iters = temperature, epsilon, sinkhorn_iters
        self.n_global, self.freeze_iters = n_global, freeze_prototypes_iters
        self.reduce_sum, self.world_size = reduce_sum, world_size
        self.use_queue = False  # switched on by the trainer after 1/5 of the epochs
        self.register_buffer("queue", torch.zeros(n_global, queue_length, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._normalize_prototypes()

    def task_head(self) -> nn.Module | None:
        return None

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1, p=2))

    def embed(self, backbone: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
        """(sum of crop batches, dim) L2-normalised projections; crops of one size share a pass."""
        feats, i = [], 0
        while i < len(crops):  # group consecutive crops of the same resolution, as SwAV does
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            feats.append(backbone(torch.cat(crops[i:j])))
            i = j
        z = self.projection(torch.cat(feats))
        return F.normalize(z.float(), dim=1, p=2)

    def loss(self, backbone: nn.Module, batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: ARG002
        crops, _ = batch
        self._normalize_prototypes()
        bs = crops[0].shape[0]
        z = self.embed(backbone, crops)  # (V*B, dim)
        out = self.prototypes(z)  # (V*B, K) cosine scores
        queue_len = self.queue.shape[1]
        total, n_views = 0.0, len(crops)
        for g in range(self.n_global):
            scores_g = out[g * bs:(g + 1) * bs].detach()
            if queue_len:
                if self.use_queue and int(self.queue_filled) >= queue_len:
                    scores_g = torch.cat([self.queue[g] @ self.prototypes.weight.detach().t(), scores_g])
                with torch.no_grad():  # push this batch's embeddings (newest last)
                    self.queue[g] = torch.cat([self.queue[g], z[g * bs:(g + 1) * bs].detach()])[-queue_len:]
            q = sinkhorn(scores_g, epsilon=self.epsilon, iters=self.iters, reduce_sum=self.reduce_sum,
                         world_size=self.world_size)[-bs:]
            sub = 0.0
            for v in range(n_views):
                if v == g:
                    continue
                logp = F.log_softmax(out[v * bs:(v + 1) * bs] / self.temperature, dim=1)
                sub = sub - (q * logp).sum(dim=1).mean()
            total = total + sub / (n_views - 1)
        if queue_len:
            self.queue_filled += bs
        return total / self.n_global, {}

    def after_backward(self, step: int) -> None:
        """Freeze the prototypes for the first iterations (drop their gradient)."""
        if step < self.freeze_iters:
            self.prototypes.weight.grad = None


# ----------------------------------------------------------------------------- DDP queue layout


def queue_to_global(queues: torch.Tensor, batch: int) -> torch.Tensor:
    """Interleave per-rank SwAV queues into the queue one process with the global batch keeps.

    Under DDP each of the W ranks keeps ``L / W`` rows of its own embeddings, in whole per-rank
    batches of ``batch`` rows (newest last). Rank ``r``'s row ``j`` of a step is row ``j * W + r``
    of that step's global batch (the strided :class:`~maskpack.data.EpochSampler` shards), so
    the union, put back in that order, is exactly the single-process queue of length ``L``.
    Checkpoints store this layout, which makes them independent of the number of processes.

    Args:
        queues: (W, n_global, L / W, dim), stacked by rank.
        batch: rows per rank per step.

    Returns:
        (n_global, L, dim).
    """
    w, g, lr, dim = queues.shape
    steps = lr // batch
    q = queues.reshape(w, g, steps, batch, dim).permute(1, 2, 3, 0, 4)  # (g, steps, b, W, dim)
    return q.reshape(g, steps * batch * w, dim)


def queue_from_global(queue: torch.Tensor, batch: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s share of a single-process queue (the inverse of :func:`queue_to_global`)."""
    g, length, dim = queue.shape
    steps = length // (batch * world_size)
    q = queue.reshape(g, steps, batch, world_size, dim)[:, :, :, rank]  # (g, steps, b, dim)
    return q.reshape(g, steps * batch, dim).contiguous()
