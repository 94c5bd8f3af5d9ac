"""The one training loop: :func:`run` builds a :class:`RunState`, trains epoch by epoch, evaluates,
checkpoints, and writes the task.

Run directory (``config.out``):
    * ``config.json``: the resolved config.
    * ``metrics.jsonl``: one JSON object per epoch.
    * ``checkpoint.pt``: written atomically after every epoch (:mod:`maskpack.checkpoint`); deleted
      after a finished run unless ``keep_checkpoint``.
    * ``task.mask`` (mask / topk) or ``model.safetensors`` (fft) at the end, written atomically.

Determinism: data order and augmentation depend only on ``(seed, epoch, index)``; head and
projection are initialised from the seed; so on CPU a run stopped after epoch e and resumed gives
bit-identical masks to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed, masking
from ..bn import set_train_mode_
from ..checkpoint import load_checkpoint
from ..data import DataBundle, load_dataset
from ..errors import ConfigError
from ..io import write_text
from ..model import TaskModel
from ..objectives import SwAVObjective
from ..runtime import autocast, resolve_device, to_device
from .build import Loaders, ModelParts, Optim, build_loaders, build_model, build_optimizer
from .config import TrainConfig, check_resume, resolve_config
from .evaluation import evaluate_run
from .state import finalize_task_, restore_, save_task, task_extras, write_checkpoint

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class RunState:
    """The live state of one training run, as callbacks see it (``info["state"]``).

    Attributes:
        config: the resolved config. backbone: the frozen :class:`maskpack.Backbone`.
        data: the dataset. device, dist: where it runs (DDP process group or one process).
        parts: model, objective, masked flag, adapting BN layers (:class:`ModelParts`).
        loaders: data loaders and the step schedule (:class:`Loaders`).
        optim: optimizer and parameter bookkeeping (:class:`Optim`).
        epoch, step: finished epochs and optimiser steps. history: one metrics dict per epoch.
        out: the run directory (None: nothing written). ddp: the DDP wrapper under torchrun.
        finalized: the model is the task as stored (extras rounded to ``extras_dtype``, BN folded).
    """

    config: TrainConfig
    backbone: Any
    data: DataBundle
    device: torch.device
    dist: distributed.DistInfo
    per_device_batch: int
    parts: ModelParts
    loaders: Loaders
    optim: Optim
    out: Path | None = None
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ddp: nn.Module | None = None
    finalized: bool = False  # extras rounded (and BN folded) into the stored task: train.state.finalize_task_

    @property
    def model(self) -> TaskModel:
        return self.parts.model

    @property
    def objective(self) -> nn.Module:
        return self.parts.objective

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optim.optimizer

    @property
    def masked(self) -> bool:
        return self.parts.masked

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def adapting_bns(self) -> list[nn.Module]:
        """The BN layers that adapt under ``bn_mode`` head / masked (looked up by name: SyncBatchNorm
        conversion replaces the modules)."""
        return [self.model.backbone.get_submodule(n) for n in self.parts.adapt_bn_names]


@dataclass
class TrainResult:
    """What :func:`run` returns.

    Attributes:
        config: the resolved config.
        model: the trained :class:`TaskModel` (masked model for masks), eval mode, on CPU.
        objective: the trained objective (head, or SwAV projection and prototypes).
        masks: ``{backbone parameter name: BoolTensor}`` (empty for fft).
        scores: ``{name: FloatTensor}`` (empty for fft).
        extras: trained non-mask tensors in TaskModel naming (head, BN buffers, ...).
        metrics: final metrics (``accuracy``, ``knn``, ``probe``, ``active``, ...).
        history: one metrics dict per epoch.
        out_dir, checkpoint_path, task_path: files written (None without ``out``; the checkpoint
            path is None once a finished run has deleted it).
    """

    config: TrainConfig
    model: TaskModel
    objective: nn.Module
    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor]
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    checkpoint_path: Path | None = None
    task_path: Path | None = None


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up then cosine to 0.

    The warm-up starts at ``1 / warmup_steps`` (never a step at lr 0) and reaches 1 at its end.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def _resume_checkpoint(out: Path) -> dict[str, Any]:
    """The run's checkpoint; a clear error when a finished run has deleted it."""
    if not (out / "checkpoint.pt").exists():
        done = [n for n in ("task.mask", "model.safetensors") if (out / n).exists()]
        if done:
            raise ConfigError(f"{out} holds a finished run ({done[0]}) whose checkpoint.pt was deleted "
                              "when it finished: nothing to resume (train with --keep-checkpoint to "
                              "extend a run later, or choose another --out)")
    return load_checkpoint(out / "checkpoint.pt")


def resume_config(out: str | os.PathLike, **overrides) -> TrainConfig:
    """The config a run directory was started with, with ``overrides`` (e.g. ``epochs``) applied
    and ``resume=True``; for continuing a run without repeating its options."""
    d = json.loads(_resume_checkpoint(Path(out))["config"])
    d.update(overrides)
    d.update(out=str(out), resume=True)
    return TrainConfig.from_dict(d)


def _check_distributed(c: TrainConfig, d: distributed.DistInfo, device: torch.device) -> int:
    """The per-device batch; DDP-only option checks (nothing to check on one process)."""
    if not d.enabled:
        return c.batch_size
    per = distributed.check_batch(c.batch_size, d.world_size)
    if c.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm trains on GPUs only): leave it "
                          "out on the CPU, or use --bn-mode frozen for batch-independent results")
    q = c.swav_queue_length
    if c.objective == "swav" and q and q % c.batch_size:
        lo = q - q % c.batch_size
        raise ConfigError(f"under DDP the SwAV queue ({q}) must be a multiple of the global batch "
                          f"({c.batch_size}): --set swav_queue_length={lo or c.batch_size}")
    return per


def _resume_or_fresh(config: TrainConfig, out: Path | None) -> tuple[TrainConfig, dict[str, Any] | None]:
    """With ``resume``: the checkpoint, and the config with knobs left at None taken from the run."""
    if not config.resume:
        if out is not None and (out / "checkpoint.pt").exists():
            raise ConfigError(f"{out} already holds a run (checkpoint.pt): add --resume to continue "
                              "it, or choose another --out")
        return config, None
    if out is None:
        raise ConfigError("--resume needs --out DIR (the run directory to continue)")
    ckpt = _resume_checkpoint(out)
    saved_dict = json.loads(ckpt["config"])
    check_resume(config, saved_dict)
    if ckpt["metadata"].get("bn.folded") == "true" and config.epochs > int(ckpt["epoch"]):
        raise ConfigError(f"{out} finished with its BN layers folded into scale/shift (bn_fold): it "
                          "cannot train further; start a new run (with --set bn_fold=false to extend "
                          "it later)")
    saved = TrainConfig.from_dict(saved_dict)
    config = dataclasses.replace(config, **{
        f.name: getattr(saved, f.name) for f in dataclasses.fields(TrainConfig)
        if getattr(config, f.name) is None and getattr(saved, f.name) is not None})
    return config, ckpt


def start(config: TrainConfig, init_scores=None) -> RunState:
    """Everything a run needs, built (and restored from the checkpoint with ``resume``)."""
    from ..backbones import load_backbone

    out = Path(config.out) if config.out else None
    config, ckpt = _resume_or_fresh(config, out)
    c = resolve_config(config)  # bad options fail before anything is loaded
    # torchrun: join the process group, take cuda:LOCAL_RANK (docs/distributed.md)
    dist, device = distributed.init(resolve_device(c.device))
    per_device_batch = _check_distributed(c, dist, device)
    if c.threads:
        torch.set_num_threads(c.threads)
    backbone = load_backbone(c.backbone, weights=c.backbone_weights)
    data = load_dataset(c.dataset, image_size=c.image_size, data_dir=c.data_dir, download=c.download,
                        quiet=c.quiet)
    if c.image_size is None:
        c.image_size = min(data.native_size, backbone.input_size)
    torch.manual_seed(c.seed)
    parts = build_model(c, backbone, data.num_classes, dist, device, None if ckpt else init_scores)
    loaders = build_loaders(c, backbone, data, dist, device.type == "cuda", per_device_batch)
    if isinstance(parts.objective, SwAVObjective):  # prototypes frozen for the first steps
        fz = c.swav_freeze_prototypes_iters
        parts.objective.freeze_iters = min(313, loaders.total_steps // 10) if fz is None else fz
    s = RunState(c, backbone, data, device, dist, per_device_batch, parts, loaders,
                 build_optimizer(c, parts), out)
    if ckpt is not None:
        restore_(s, ckpt)
    if dist.enabled:
        s.ddp = _wrap_ddp(s)
    if out is not None and dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")
    return s


class _LossStep(nn.Module):
    """``objective.loss(backbone, batch, step)`` as one module's forward, for DDP to wrap."""

    def __init__(self, backbone: nn.Module, objective: nn.Module):
        super().__init__()
        self.backbone, self.objective = backbone, objective

    def forward(self, batch, step: int):
        return self.objective.loss(self.backbone, batch, step)


def _wrap_ddp(s: RunState) -> nn.Module:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    step = _LossStep(s.model.backbone, s.objective)
    if isinstance(s.objective, SwAVObjective):  # the queue is per rank: never broadcast it
        DDP._set_params_and_buffers_to_ignore_for_model(step, ["objective.queue", "objective.queue_filled"])
    # Without SyncBatchNorm, DDP broadcasts rank 0's buffers (BN running statistics) before every
    # forward: all ranks train with rank 0's running statistics (docs/distributed.md).
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"  # renamed in newer PyTorch, same meaning
    return DDP(step, device_ids=[s.device.index] if s.cuda else None, **{sync: not s.config.sync_bn})


def _emit(callbacks: Sequence[Callback], event: str, s: RunState, **info) -> None:
    for cb in callbacks:
        cb(event, {"state": s, **info})


def _set_lr(s: RunState) -> None:
    factor = lr_factor(s.step, s.loaders.total_steps, s.loaders.warmup_steps, s.config.schedule)
    for g in s.optim.optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def _step(s: RunState, batch) -> tuple[float, dict[str, float]]:
    """One optimiser step on one batch; returns the loss and the objective's statistics."""
    c = s.config
    _set_lr(s)
    batch = to_device(batch, s.device, s.cuda and c.channels_last)
    with autocast(s.device, c.amp):
        if s.ddp is not None:  # DDP averages the score and head gradients over ranks
            loss, stats = s.ddp(batch, s.step)
        else:
            loss, stats = s.objective.loss(s.model.backbone, batch, s.step)
    s.optim.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    s.objective.after_backward(s.step)
    if c.score_grad_norm:  # per-tensor normalised score updates
        for p in s.optim.score_params:
            if p.grad is not None:
                p.grad.div_(p.grad.abs().mean().clamp_min(1e-12))
    if s.step < s.loaders.head_only_steps:
        for p in s.optim.backbone_params:
            p.grad = None
    s.optim.optimizer.step()
    lv = float(loss.detach())
    if not math.isfinite(lv):
        raise ConfigError(f"loss became {lv} at step {s.step}: lower --lr or --head-lr")
    s.step += 1
    return lv, stats


def _reduce_epoch(s: RunState, loss_sum: float, n_img: int, stats_sum: dict[str, float]):
    if not s.dist.enabled:
        return loss_sum, n_img, stats_sum
    keys = sorted(stats_sum)  # epoch metrics over the global batch
    tot = distributed.all_reduce_sum(torch.tensor([loss_sum, n_img, *[stats_sum[k] for k in keys]],
                                                  dtype=torch.float64)).tolist()
    return tot[0], int(tot[1]), dict(zip(keys, tot[2:], strict=True))


def train_epoch(s: RunState, progress, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train one epoch; returns its metrics row (loss, lr, speed, active fraction, statistics)."""
    c = s.config
    s.finalized = False  # training on: the end of the run finalises the task again
    s.loaders.sampler.set_epoch(s.epoch)
    if isinstance(s.objective, SwAVObjective):
        s.objective.use_queue = s.epoch >= int(c.swav_queue_start * c.epochs)
    s.model.train()
    s.objective.train()
    set_train_mode_(s.model, c.bn_mode, s.adapting_bns())
    loss_sum, n_img, stats_sum, t0 = 0.0, 0, {}, time.perf_counter()
    label = f"epoch {s.epoch + 1}/{c.epochs}"
    task = progress.add_task(label, total=s.loaders.steps_per_epoch) if progress else None
    for i, batch in enumerate(s.loaders.train):
        if i >= s.loaders.steps_per_epoch:
            break
        bs = batch[1].shape[0] if isinstance(batch[1], torch.Tensor) else len(batch[1])
        lv, stats = _step(s, batch)
        loss_sum, n_img = loss_sum + lv * bs, n_img + bs
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v * bs
        _emit(callbacks, "step_end", s, step=s.step, loss=lv)
        if task is not None:
            ips = n_img / max(time.perf_counter() - t0, 1e-9)
            lr = s.optim.optimizer.param_groups[0]["lr"]
            progress.update(task, advance=1, description=f"{label} loss {loss_sum / n_img:.4f} lr {lr:.4g} "
                                                         f"{ips:.0f} img/s")
    loss_sum, n_img, stats_sum = _reduce_epoch(s, loss_sum, n_img, stats_sum)
    if s.cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if task is not None:
        progress.remove_task(task)
    s.epoch += 1
    row = {"epoch": s.epoch, "step": s.step, "loss": loss_sum / max(n_img, 1),
           "lr": s.optim.optimizer.param_groups[0]["lr"], "images_per_s": n_img / max(elapsed, 1e-9),
           "epoch_seconds": elapsed}
    row.update({k: v / max(n_img, 1) for k, v in stats_sum.items()})
    row["active"] = masking.active_fraction(s.model.backbone) if s.masked else 1.0
    return row


def _progress(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)


def _fmt(row: dict[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    for k in ("loss", "lr", "active", "train_acc", "accuracy", "knn", "probe", "images_per_s"):
        if k in row:
            parts.append(f"{k} {row[k]:.4g}" if k != "images_per_s" else f"{row[k]:.0f} img/s")
    return "  ".join(parts)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # One line per epoch: the checkpoint is written first, so after a kill the metrics file never
    # claims an epoch the checkpoint lacks. A rewrite keeps it consistent on resume.
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) < row["epoch"]]
    lines.append(json.dumps(row))
    write_text(path, "\n".join(lines) + "\n")


def run(config: TrainConfig, callbacks: Sequence[Callback] = (), *,
        init_scores: dict[str, torch.Tensor] | str | os.PathLike | None = None) -> TrainResult:
    """Train a mask (or fine-tune) as ``config`` says; write the run directory when ``config.out``.

    Args:
        config: the run's settings; ``None`` knobs come from ``config.recipe``.
        callbacks: ``cb(event, info)`` for events ``train_start``, ``step_end`` (``step``,
            ``loss``), ``epoch_end`` (``metrics``), ``train_end`` (``metrics``); ``info["state"]``
            is the live :class:`RunState`. An exception in a callback stops training (the last
            epoch's checkpoint stays valid).
        init_scores: start the scores from these (``{name: tensor}``, or a ``checkpoint.pt``
            path), e.g. cascade experts from a dispatcher. Ignored on resume.

    Returns:
        A :class:`TrainResult`.

    Example:
        >>> result = run(TrainConfig(dataset="digits", epochs=2, out="runs/d"))  # doctest: +SKIP
        >>> result.metrics["accuracy"], result.task_path                        # doctest: +SKIP
    """
    s = start(config, init_scores)
    c = s.config
    main = s.dist.is_main  # under DDP only rank 0 prints and writes
    progress = _progress(c.quiet or not main)
    metrics_path = s.out / "metrics.jsonl" if s.out else None
    if main and metrics_path is not None and not config.resume and metrics_path.exists():
        metrics_path.unlink()
    _emit(callbacks, "train_start", s)
    stop = c.epochs if c.stop_after is None else min(c.epochs, s.epoch + c.stop_after)
    if progress:
        progress.start()
    try:
        while s.epoch < stop:
            row = train_epoch(s, progress, callbacks)
            final = s.epoch == c.epochs
            if final or (c.eval_every and s.epoch % c.eval_every == 0):
                row.update(evaluate_run(s, final=final))
            s.history.append(row)
            if s.out is not None:
                write_checkpoint(s)  # after eval: the final checkpoint holds re-estimated BN stats
                if main:
                    _append_jsonl(metrics_path, row)
            if progress:
                progress.console.print(_fmt(row))
            _emit(callbacks, "epoch_end", s, metrics=row)
    finally:
        if progress:
            progress.stop()
    return _finish(s, callbacks)


def _finish(s: RunState, callbacks: Sequence[Callback]) -> TrainResult:
    c = s.config
    s.model.eval()
    if s.epoch >= c.epochs:  # a run resumed at its end from a checkpoint written before rounding
        finalize_task_(s)
    masks = masking.extract_masks(s.model.backbone) if s.masked else {}
    scores = masking.extract_scores(s.model.backbone) if s.masked else {}
    extras = task_extras(s)
    metrics = dict(s.history[-1]) if s.history else {}
    if s.masked:
        metrics["active"] = masking.active_fraction(masks)
    task_path, ckpt_path = None, (s.out / "checkpoint.pt") if s.out else None
    if s.out is not None and c.save_task and s.epoch >= c.epochs:
        task_path = save_task(s, masks, extras) if s.dist.is_main else s.out / (
            "task.mask" if s.masked else "model.safetensors")
        if not c.keep_checkpoint:  # the task file holds the finished run: the resume state goes
            if s.dist.is_main:
                ckpt_path.unlink(missing_ok=True)
            ckpt_path = None
    distributed.barrier()  # DDP: the task file exists before any rank goes on
    s.model.to("cpu")
    _emit(callbacks, "train_end", s, metrics=metrics)
    return TrainResult(c, s.model, s.objective.cpu(), masks, scores, extras, metrics, s.history, s.out,
                       ckpt_path, task_path)
