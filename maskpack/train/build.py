"""The parts of a training run, each built from the config: model, data loaders, optimizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed, masking
from ..bn import BatchNorm, adapting_bn_names, bn_after
from ..checkpoint import load_checkpoint
from ..data import (
    Augmented,
    DataBundle,
    EpochSampler,
    MultiCrop,
    eval_transform,
    label_subset,
    make_loader,
    supervised_transform,
)
from ..errors import ConfigError, DataError
from ..model import TaskModel
from ..objectives import SupervisedObjective, SwAVObjective
from .config import TrainConfig


@dataclass
class ModelParts:
    """What :func:`build_model` returns.

    Attributes:
        model: the :class:`TaskModel` being trained (masked backbone for masks) on the device.
        objective: the loss module (supervised head, or SwAV projection and prototypes).
        masked: True for ``mask`` / ``topk``.
        adapt_bn_names: the backbone's BN layers that adapt under ``bn_mode`` head / masked.
    """

    model: TaskModel
    objective: nn.Module
    masked: bool
    adapt_bn_names: list[str]


def _objective(c: TrainConfig, feat: int, num_classes: int, dist: distributed.DistInfo) -> nn.Module:
    if c.objective == "supervised":
        return SupervisedObjective(feat, num_classes)
    # DDP: Sinkhorn's sums run over the global batch (all-reduce), as in the SwAV reference
    reduce = {"reduce_sum": distributed.all_reduce_sum, "world_size": dist.world_size} if dist.enabled else {}
    return SwAVObjective(
        feat, dim=c.swav_dim, hidden=c.swav_hidden, prototypes=c.swav_prototypes,
        temperature=c.swav_temperature, epsilon=c.swav_epsilon, sinkhorn_iters=c.swav_sinkhorn_iters,
        n_global=c.swav_crops[0], queue_length=c.swav_queue_length // dist.world_size, **reduce)


def _mask_(net: nn.Module, c: TrainConfig, layer_fn, init_scores, masked_bns: list[str]) -> None:
    masking.apply_masks_(net, layer_fn, mask_bias=c.mask_bias, init=c.score_init, threshold=c.threshold,
                         mode="topk" if c.method == "topk" else "threshold", k=c.topk_k,
                         scale=c.scale, detach_alpha=c.detach_alpha, seed=c.seed)
    if init_scores is not None:
        if isinstance(init_scores, (str, os.PathLike)):
            init_scores = load_checkpoint(init_scores)["scores"]
        masking.load_scores_(net, init_scores)
    if c.train_bn_affine:  # every BN layer, or (bn_affine_scope masked) the masked layers' own BN
        only = set(masked_bns) if c.bn_affine_scope == "masked" else None
        for name, m in net.named_modules():
            if isinstance(m, BatchNorm) and (only is None or name in only):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)


def build_model(c: TrainConfig, backbone, num_classes: int, dist: distributed.DistInfo,
                device: torch.device, init_scores=None) -> ModelParts:
    """A copy of the backbone, masked (or trainable for fft), with its objective, on ``device``.

    Args:
        c: the resolved config.
        backbone: the frozen :class:`maskpack.Backbone`.
        num_classes: classes of the supervised head.
        dist: the process group (DDP) or a single process.
        device: where to train.
        init_scores: start the scores from these (``{name: tensor}`` or a checkpoint path).
    """
    net = backbone.copy_model()
    masked = c.method in ("mask", "topk")
    if c.bn_mode == "masked" and not masked:
        raise ConfigError("--bn-mode masked adapts the BN layers after masked layers: it needs "
                          "--method mask or topk (fft: use --bn-mode train, head or frozen)")
    layer_fn = masking.layer_filter(c.mask_layers, net) if masked else None
    owners = set()
    if masked:
        selected = masking.select_parameters(net, layer_fn, mask_bias=c.mask_bias)
        owners = {n.rpartition(".")[0] for n, _, _ in selected}
    adapt = adapting_bn_names(net, c.bn_mode, owners if c.bn_mode == "masked" else set(), backbone=c.backbone)
    if masked:
        _mask_(net, c, layer_fn, init_scores, bn_after(net, owners))
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    objective = _objective(c, backbone.feature_dim, num_classes, dist)
    model = TaskModel(net, objective.task_head())
    if dist.enabled and c.sync_bn:  # same Parameter and buffer objects, new BN modules
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    model.to(device)
    objective.to(device)
    if device.type == "cuda" and c.channels_last:
        model.to(memory_format=torch.channels_last)
    if masked and c.compile:  # after the moves: the fused layout is built on the final device
        masking.compile_masks_(model.backbone)
    return ModelParts(model, objective, masked, adapt)


@dataclass
class Loaders:
    """What :func:`build_loaders` returns: the training loader and its schedule, the evaluation
    loaders (train bank and test split, clean images) and the BN re-estimation loader."""

    train_set: Augmented
    sampler: EpochSampler
    train: Any
    eval_train: Any
    eval_test: Any
    bn: Any
    labelled: list[int]
    workers: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    head_only_steps: int


def _train_transform(c: TrainConfig, bb, d: DataBundle):
    if c.objective == "supervised":
        return supervised_transform(c.image_size, bb.mean, bb.std, flip=d.flip, native_size=d.native_size)
    return MultiCrop(c.image_size, bb.mean, bb.std, n_global=c.swav_crops[0], n_local=c.swav_crops[1],
                     global_scale=c.swav_global_scale, local_scale=c.swav_local_scale,
                     local_size=c.swav_local_size, flip=d.flip, jitter=c.swav_jitter, blur=c.swav_blur)


def _eval_loader(dataset: Augmented, dist: distributed.DistInfo, kw: dict[str, Any]):
    # DDP: each rank extracts a strided shard; evaluation gathers them back in order
    if dist.enabled:
        kw = dict(kw, sampler=EpochSampler(len(dataset), shuffle=False, rank=dist.rank,
                                           world_size=dist.world_size))
    return make_loader(dataset, **kw)


def _training_indices(c: TrainConfig, d: DataBundle) -> tuple[list[int], list[int]]:
    """(labelled indices, indices trained on) of the train split."""
    base = list(range(len(d.train))) if c.train_indices is None else list(c.train_indices)
    if base and (min(base) < 0 or max(base) >= len(d.train)):
        raise DataError(f"train_indices out of range for {d.name} ({len(d.train)} training images)")
    labels = d.train_labels()[base]
    labelled = [base[i] for i in label_subset(labels, c.labels, c.seed)]
    return labelled, (labelled if c.objective == "supervised" else base)


def build_loaders(c: TrainConfig, bb, d: DataBundle, dist: distributed.DistInfo, cuda: bool,
                  per_device_batch: int) -> Loaders:
    """Data loaders and the step schedule of a run (see :class:`Loaders`)."""
    labelled, train_idx = _training_indices(c, d)
    train_set = Augmented(d.train, _train_transform(c, bb, d), train_idx)
    if len(train_set) < 2:
        raise DataError(f"only {len(train_set)} training image(s) after the label fraction "
                        f"{c.labels}: use more labels")
    workers = c.num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else 0
    w = dist.world_size  # under DDP each rank takes a strided shard of every permutation
    sampler = EpochSampler(len(train_set), seed=c.seed, rank=dist.rank, world_size=w)
    drop_last = len(train_set) >= c.batch_size
    if w > 1 and not drop_last:
        raise DataError(f"{len(train_set)} training images are fewer than the global batch "
                        f"{c.batch_size}: lower --batch-size or train on one process")
    loader = make_loader(train_set, batch_size=per_device_batch, sampler=sampler, num_workers=workers,
                         pin_memory=cuda, drop_last=drop_last)
    # every rank must take the same number of steps: whole global batches only
    steps = len(loader) if w == 1 else len(train_set) // c.batch_size
    if len(train_set) % c.batch_size == 1 and not drop_last:
        raise DataError("a batch of one image cannot train BatchNorm: change --batch-size")
    per_epoch = min(steps, c.max_steps_per_epoch or steps)
    ev = eval_transform(c.image_size, bb.mean, bb.std)
    ekw = dict(batch_size=max(c.batch_size, 128), num_workers=workers, pin_memory=cuda)
    # BN re-estimation sees clean images of the training set in a seeded random order: the first
    # batches of the stored order would be a few classes only (ImageFolder is sorted by class),
    # which skews every statistic. Same order on every rank and every evaluation.
    bn_set = Augmented(d.train, ev, train_idx)
    bn_loader = make_loader(bn_set, batch_size=c.batch_size, sampler=EpochSampler(len(bn_set), seed=c.seed,
                            shuffle=True), num_workers=workers, pin_memory=cuda)
    return Loaders(train_set, sampler, loader,
                   _eval_loader(Augmented(d.train, ev, labelled), dist, ekw),
                   _eval_loader(Augmented(d.test, ev), dist, ekw), bn_loader, labelled, workers,
                   per_epoch, per_epoch * c.epochs, int(round(c.warmup * per_epoch)),
                   int(round(c.head_only_epochs * per_epoch)))


@dataclass
class Optim:
    """What :func:`build_optimizer` returns.

    Attributes:
        optimizer: SGD with momentum over the parameter groups ``scores`` / ``weights`` / ``head``
            (each with ``name`` and ``base_lr``).
        score_params: the score tensors (never weight-decayed).
        backbone_params: what the head-only phase holds still (scores, BN weight/bias, fft weights).
        param_names: ``id(param) -> name`` (``model.*`` / ``objective.*``), for checkpoints.
    """

    optimizer: torch.optim.SGD
    score_params: list[nn.Parameter]
    backbone_params: list[nn.Parameter]
    param_names: dict[int, str]


def named_trainables(model: nn.Module, objective: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters with ``requires_grad`` of the model and the objective, each once, by name."""
    seen, out = set(), []
    for prefix, mod in (("model.", model), ("objective.", objective)):
        for n, p in mod.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((prefix + n, p))
    return out


def build_optimizer(c: TrainConfig, parts: ModelParts) -> Optim:
    """SGD over scores (never decayed), weights (fft, or BN weight/bias of masks) and the head."""
    scores = {id(p) for p in masking.score_parameters(parts.model.backbone)}
    head = {id(p) for p in parts.objective.parameters()}
    # fft: all weights at lr; masks: only BN affine (train_bn_affine) at bn_lr, never at the score lr
    weights_lr = c.lr if not parts.masked else (c.bn_lr if c.bn_lr is not None else c.head_lr)
    groups: dict[str, dict[str, Any]] = {
        "scores": {"params": [], "lr": c.lr, "weight_decay": 0.0},
        "weights": {"params": [], "lr": weights_lr, "weight_decay": c.weight_decay},
        "head": {"params": [], "lr": c.head_lr,
                 "weight_decay": c.weight_decay if c.method == "fft" else c.head_weight_decay},
    }
    names: dict[int, str] = {}
    for name, p in named_trainables(parts.model, parts.objective):
        names[id(p)] = name
        key = "scores" if id(p) in scores else "head" if id(p) in head else "weights"
        groups[key]["params"].append(p)
    used = []
    for key, g in groups.items():
        if g["params"]:
            g["name"], g["base_lr"] = key, g["lr"]
            used.append(g)
    optimizer = torch.optim.SGD(used, lr=c.lr, momentum=c.momentum)
    score_params = list(groups["scores"]["params"])
    return Optim(optimizer, score_params, score_params + list(groups["weights"]["params"]), names)
