"""Training a cascade: dispatcher, router, experts, combination, file (docs/cascade.md).

1. **Dispatcher**: a SwAV mask over the frozen backbone (trained here, or taken from a run).
2. **Router**: the dispatcher's features of the training set, PCA to 20 dimensions, then a
   K-way Gaussian mixture (:mod:`.fit`).
3. **Experts**: per cluster, a mask initialised from the dispatcher's scores (and SwAV head),
   trained on that cluster's images for about the dispatcher's number of steps.
4. **Combination** of ``[D, E1..EK]`` (unconditional) or of the dispatcher's and the routed
   expert's blocks only (conditional), :mod:`.combine`; k-NN and probe on the test split.
5. **Storage**: one ``.mask`` file (:mod:`.format`).

Example:
    >>> from maskpack.cascade import CascadeConfig, train_cascade, load_cascade
    >>> result = train_cascade(CascadeConfig(dispatcher="runs/swav", out="runs/cascade"))  # doctest: +SKIP
    >>> model = load_cascade("runs/cascade/cascade.mask")                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed, io
from ..errors import ConfigError, DataError, FormatError
from ..model import TaskModel
from .combine import DEFAULT_KIND, DTYPES, check_kind
from .experts import DEFAULT_EXPERT_LAYERS, check_expert_bn, expert_scope, expert_tensors
from .fit import MANTISSA_BITS, ROUTER_DTYPES, fit_combination, fit_router
from .format import load_cascade, read_cascade, save_cascade
from .model import MODES, CascadeModel

Log = Callable[[str], None]


@dataclass
class CascadeConfig:
    """Settings of :func:`train_cascade`.

    Attributes:
        dispatcher: an existing dispatcher (run directory, ``checkpoint.pt``, or ``.mask``: then
            experts start from +-1 scores of its mask); None trains one with ``train``.
        train: the dispatcher's training config (default: SwAV mask on digits at 32 px); experts
            reuse it with their cluster's ``train_indices`` and their own epochs.
        experts: K, the number of clusters and expert masks.
        router_dim: PCA dimensions before the mixture.
        expert_steps: optimiser steps per expert (default: the dispatcher's total steps).
        modes: combinations to fit, evaluate and store.
        combine: the combination (:data:`maskpack.cascade.combine.KINDS`): ``subspace`` (each
            block on the router's PCA basis, then a ZCA whitening; the default), ``l2`` (blocks
            L2-normalised and concatenated, nothing stored), ``standardize`` or ``pca`` (the dense
            whitened PCA of version-1 files).
        combine_width: principal components kept by ``pca`` (its output width) / ``subspace``
            (capped at the training data's rank); None: the dispatcher's width F for ``pca``,
            all (K+1)P for ``subspace``.
        combine_dtype: ``float16`` or ``float32`` for the stored combination tensors.
        router_dtype: ``float16``, ``float32`` or ``float64``: the router's stored precision (the
            routes are computed from the rounded values, in training as after loading).
        mantissa_bits: mantissa bits kept in the largest stored matrices, the router's PCA basis
            and the combination's whitening / components (float16 has 10); fewer compress better.
            The cascade is fitted and evaluated with the rounded values. None: all of the dtype's.
        expert_layers: which of the dispatcher's masked tensors the experts train: ``all`` or
            ``last:N``; the others keep the dispatcher's mask (their XOR deltas are all zero).
        expert_bn: ``adapt``: the BN layers right after the experts' trained tensors adapt to the
            cluster (under the dispatcher's ``bn_mode``; stored per expert); ``frozen``: experts
            use the dispatcher's BN statistics (nothing stored).
        probe: also fit logistic-regression probes (k-NN is always computed).
        out: directory for the dispatcher / expert runs, ``cascade.mask`` and ``cascade.json``.
        seed: router seed (the training runs use ``train.seed``).
        quiet: no progress output.
    """

    dispatcher: str | None = None
    train: Any = None  # TrainConfig; Any keeps the trainer out of the loader's imports
    experts: int = 5
    router_dim: int = 20
    expert_steps: int | None = None
    modes: tuple[str, ...] = ("unconditional",)  # the conditional mode is stored only on request
    combine: str = DEFAULT_KIND
    combine_width: int | None = None
    combine_dtype: str = "float16"
    router_dtype: str = "float16"
    mantissa_bits: int | None = MANTISSA_BITS
    expert_layers: str = DEFAULT_EXPERT_LAYERS
    expert_bn: str = "frozen"
    probe: bool = True
    out: str = "runs/cascade"
    seed: int = 0
    quiet: bool = False
    train_indices: list[int] | None = None


@dataclass
class CascadeResult:
    """What :func:`train_cascade` returns.

    Attributes:
        model: the trained :class:`CascadeModel` (CPU, eval mode).
        path: the written cascade file.
        clusters: training images per cluster.
        metrics: ``{"dispatcher"|mode: {"knn": ..., "probe": ...}}`` on the test split.
        storage: byte counts and multiples (see :func:`storage_report`).
        info: everything else written to ``cascade.json``.
    """

    model: CascadeModel
    path: Path
    clusters: list[int]
    metrics: dict[str, dict[str, float]]
    storage: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Task:
    """A trained mask: masks, scores (None for a .mask dispatcher), extras, objective state."""

    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor] | None
    extras: dict[str, torch.Tensor]
    config: Any  # TrainConfig
    steps: int
    objective: dict[str, torch.Tensor] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def _echo(quiet: bool) -> Log:
    if quiet:
        return lambda _msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(msg, highlight=False)


def default_train_config(**overrides):
    """The dispatcher's default training config: a SwAV mask on digits at 32 px."""
    from ..train import TrainConfig

    base = dict(dataset="digits", objective="swav", method="mask", image_size=32, epochs=4,
                eval_every=0, eval_knn="never")
    base.update(overrides)
    for key in ("swav_crops", "swav_global_scale", "swav_local_scale"):  # JSON gives lists
        if isinstance(base.get(key), list):
            base[key] = tuple(base[key])
    return TrainConfig(**base)


def _run_dir_task(out: Path, config, init_scores=None, callbacks=(), scope=None) -> _Task:
    """Train (or finish / reuse) the run in ``out``: resumes when a checkpoint is there.

    ``callbacks`` run on a fresh start only; ``scope(fresh)`` builds one that runs either way.
    """
    from ..train import run

    resume = (out / "checkpoint.pt").exists()
    # the finished run is reused from its checkpoint (scores, objective): keep it
    config = dataclasses.replace(config, out=str(out), resume=resume, keep_checkpoint=True)
    cbs = [*(callbacks if not resume else ()), *([scope(not resume)] if scope else [])]
    r = run(config, cbs, init_scores=None if resume else init_scores)
    if not r.history:
        raise ConfigError(f"{out}: the run holds no finished epoch")
    steps = int(r.history[-1]["step"])
    obj = {k: v.detach().cpu().clone() for k, v in r.objective.state_dict().items()}
    return _Task(r.masks, r.scores, r.extras, r.config, steps, obj)


def load_dispatcher(path: str | os.PathLike) -> _Task:
    """A finished dispatcher from a run directory, its ``checkpoint.pt``, or a ``.mask`` file."""
    from ..checkpoint import load_checkpoint, masks_from_checkpoint
    from ..train import TrainConfig

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.exists():
        raise FileNotFoundError(2, "No such file", str(p))
    if p.suffix == ".mask":
        mf = io.read(p)
        if mf.metadata.get("cascade.format"):
            raise FormatError(f"{p} is already a cascade; give the dispatcher's own run or .mask file")
        keys = ("backbone", "dataset", "image_size", "method", "objective")
        cfg = default_train_config(**{k: mf.metadata[k] for k in keys if k in mf.metadata})
        cfg.image_size = int(cfg.image_size)
        from ..backbones import load_backbone

        masks = mf.masks(load_backbone(mf.backbone_name))
        return _Task(masks, None, mf.extras, cfg, int(mf.metadata.get("steps", "0") or 0),
                     metadata=dict(mf.metadata))
    ckpt = load_checkpoint(p)
    cfg = TrainConfig.from_dict(json.loads(ckpt["config"]))
    if int(ckpt["epoch"]) < cfg.epochs:
        raise ConfigError(f"dispatcher {p} stopped at epoch {ckpt['epoch']} of {cfg.epochs}: finish it "
                          f"first (maskpack train --resume --out {p.parent})")
    return _Task(masks_from_checkpoint(ckpt), ckpt["scores"], ckpt["extras"], cfg, int(ckpt["step"]),
                 ckpt["objective"], dict(ckpt["metadata"]))


def _scores_from_masks(masks: dict[str, torch.Tensor], init: float) -> dict[str, torch.Tensor]:
    return {k: torch.where(m, torch.tensor(init), torch.tensor(-init)).float() for k, m in masks.items()}


def _expert_config(disp, indices: list[int], steps: int, seed: int, expert_bn: str = "adapt"):
    """The dispatcher's config on one cluster, with enough epochs for ~``steps`` steps
    (``expert_bn="frozen"``: no BN layer adapts or is re-estimated)."""
    n, b = len(indices), disp.batch_size
    per_epoch = max(1, n // b) if n >= b else 1
    if disp.max_steps_per_epoch:
        per_epoch = min(per_epoch, disp.max_steps_per_epoch)
    epochs = max(1, int(round(steps / per_epoch)))
    warm = None  # same fraction of the schedule as the dispatcher's warm-up
    if isinstance(disp.warmup, (int, float)):
        warm = float(disp.warmup) / max(disp.epochs, 1) * epochs
    # the expert starts from the dispatcher's trained SwAV head: no head-only phase
    bn = {"bn_mode": "masked", "bn_reestimate": False} if expert_bn == "frozen" else {}
    return dataclasses.replace(disp, train_indices=list(indices), epochs=epochs, warmup=warm,
                               head_only_epochs=0.0, **bn,
                               eval_every=0, eval_knn="never", probe=False, stop_after=None,
                               resume=False, seed=seed), epochs * per_epoch


def _load_objective(state: dict[str, torch.Tensor] | None):
    """A ``train_start`` callback that starts the expert's SwAV head from the dispatcher's."""

    def cb(event: str, info: dict[str, Any]) -> None:
        if event == "train_start" and state:
            # Projection and prototypes only: the queue holds other clusters' features.
            obj = info["state"].objective
            own = obj.state_dict()
            params = {k: v for k, v in state.items() if not k.startswith("queue")}
            if set(params) <= set(own) and all(own[k].shape == v.shape for k, v in params.items()):
                obj.load_state_dict(params, strict=False)

    return cb


def _model_of(backbone, task: _Task) -> TaskModel:
    from ..rehydrate import rehydrate

    scale = getattr(task.config, "scale", True)
    return rehydrate(backbone, task.masks, task.extras, scale=scale)


def _features(models: list[TaskModel], dataset, indices, size: int, backbone, batch_size: int = 256):
    """Features of every model on the images (clean eval transform): list of (N, F), labels (N,)."""
    from ..data import Augmented, eval_transform, make_loader
    from ..evaluate import extract_features

    loader = make_loader(Augmented(dataset, eval_transform(size, backbone.mean, backbone.std), indices),
                         batch_size=batch_size)
    feats, labels = [], None
    for m in models:
        f, labels = extract_features(m, loader, device="cpu", amp=False)
        feats.append(f)
    return feats, labels


def _scores(train_f, y_tr, test_f, y_te, probe: bool, seed: int, num_classes: int, *,
            knn: bool = True) -> dict[str, float]:
    from ..evaluate import knn_accuracy, linear_probe

    out = {"knn": knn_accuracy(train_f, y_tr, test_f, y_te, num_classes=num_classes)} if knn else {}
    if probe:
        out["probe"] = linear_probe(train_f.numpy(), y_tr.numpy(), test_f.numpy(), y_te.numpy(), seed=seed)
    return out


def _check_clusters(routes: torch.Tensor, k: int) -> list[int]:
    sizes = torch.bincount(routes, minlength=k).tolist()
    small = [i for i, s in enumerate(sizes) if s < 2]
    if small:
        raise DataError(f"cluster(s) {small} of the router got fewer than 2 training images (sizes "
                        f"{sizes}): use fewer experts (--experts) or more data")
    return sizes


def _dtype(name: str, table: dict[str, torch.dtype], what: str) -> torch.dtype:
    if name not in table:
        raise ConfigError(f"{what} {name!r}: use {', '.join(table)}")
    return table[name]


def _config_json(c: CascadeConfig) -> dict[str, Any]:
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "train"}
    d["modes"] = list(c.modes)
    d["train"] = c.train.to_dict() if c.train is not None else None
    return d


def _check(c: CascadeConfig) -> tuple[torch.dtype, torch.dtype]:
    """Validate the cascade options; returns the combination's and the router's stored dtypes."""
    if c.experts < 1:
        raise ConfigError(f"--experts must be at least 1, got {c.experts}")
    bad = [m for m in c.modes if m not in MODES]
    if bad or not c.modes:
        raise ConfigError(f"unknown combination mode(s) {bad}: use {', '.join(MODES)}")
    check_kind(c.combine)
    check_expert_bn(c.expert_bn)
    expert_tensors(c.expert_layers, [])  # syntax only; the names are the dispatcher's
    bits = c.mantissa_bits
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 23):
        raise ConfigError(f"--mantissa-bits must be an integer in 1..23, got {c.mantissa_bits!r}")
    return (_dtype(c.combine_dtype, DTYPES, "combine dtype"),
            _dtype(c.router_dtype, ROUTER_DTYPES, "router dtype"))


def _dispatcher_stage(c: CascadeConfig, out: Path, log: Log) -> tuple[_Task, Any]:
    """The dispatcher (given, or trained in ``out/dispatcher``) and the config experts start from."""
    if c.dispatcher is not None:
        disp = load_dispatcher(c.dispatcher)
        log(f"dispatcher: {c.dispatcher} ({disp.steps} steps)")
    else:
        tc = c.train if c.train is not None else default_train_config()
        tc = dataclasses.replace(tc, quiet=c.quiet or tc.quiet, train_indices=c.train_indices
                                 if c.train_indices is not None else tc.train_indices)
        log(f"dispatcher: training a {tc.objective} {tc.method} on {tc.dataset} in {out / 'dispatcher'}")
        disp = _run_dir_task(out / "dispatcher", tc)
    dcfg = dataclasses.replace(disp.config, quiet=c.quiet or disp.config.quiet)
    if c.train is not None and c.dispatcher is not None:  # runtime knobs (threads, device) from the caller
        dcfg = dataclasses.replace(dcfg, threads=c.train.threads, device=c.train.device,
                                   download=c.train.download)
    return disp, dcfg


def _experts_stage(c: CascadeConfig, out: Path, disp: _Task, dcfg, train_idx: list[int],
                   routes_tr: torch.Tensor, log: Log) -> list[_Task]:
    steps = c.expert_steps or disp.steps or dcfg.epochs * max(1, len(train_idx) // dcfg.batch_size)
    init = disp.scores if disp.scores is not None else _scores_from_masks(disp.masks, dcfg.score_init)
    trained = expert_tensors(c.expert_layers, list(disp.masks))
    log(f"experts train {len(trained)} of the dispatcher's {len(disp.masks)} masked tensors; "
        f"BN {c.expert_bn}")

    def scope(fresh: bool):
        return expert_scope(trained, c.expert_bn, disp.extras if fresh else None)

    experts = []
    for k in range(c.experts):
        idx = [train_idx[i] for i in (routes_tr == k).nonzero().flatten().tolist()]
        ecfg, n_steps = _expert_config(dcfg, idx, steps, dcfg.seed, c.expert_bn)
        log(f"expert {k + 1}/{c.experts}: {len(idx)} images, {ecfg.epochs} epochs (~{n_steps} steps)")
        experts.append(_run_dir_task(out / f"expert{k + 1}", ecfg, init, [_load_objective(disp.objective)],
                                     scope))
    return experts


def _combine_stage(c: CascadeConfig, d_model, e_models, router, d_tr, e_tr, routes_tr, test_f, y_tr, y_te,
                   num_classes: int, dtype: torch.dtype, log: Log):
    """Fit each mode's combination on the training set; k-NN / probe on the test split."""
    blocks_tr = {"unconditional": torch.cat([d_tr, *e_tr], 1),
                 "conditional": CascadeModel.conditional_blocks([d_tr, *e_tr], routes_tr)}
    n = len(e_tr) + 1
    full = n * router["pca_components"].shape[0] if c.combine == "subspace" else d_tr.shape[1]
    fit = dict(width=c.combine_width or full, seed=c.seed, dtype=dtype, kind=c.combine, router=router,
               bits=c.mantissa_bits)
    combine = {mode: fit_combination(blocks_tr[mode], n_blocks=n, **fit) for mode in c.modes}
    model = CascadeModel(d_model, e_models, router, combine, mode=c.modes[0], combine_kind=c.combine)
    routes_te = model.route_features(test_f[0])
    blocks_te = {"unconditional": torch.cat(test_f, 1),
                 "conditional": CascadeModel.conditional_blocks(test_f, routes_te)}
    log("evaluating: k-NN" + (" and linear probe" if c.probe else ""))
    metrics = {"dispatcher": _scores(d_tr, y_tr, test_f[0], y_te, c.probe, c.seed, num_classes)}
    # Control: the dispatcher's own features through the same kind of combination (no experts), to
    # tell what the combination alone does from what the experts add.
    alone = CascadeModel(d_model, [], router, {"unconditional": fit_combination(d_tr, n_blocks=1, **fit)},
                         combine_kind=c.combine)
    metrics["dispatcher_combined"] = _scores(alone.combine(d_tr), y_tr, alone.combine(test_f[0]), y_te,
                                             c.probe, c.seed, num_classes)
    for mode in c.modes:
        metrics[mode] = _scores(model.combine(blocks_tr[mode], mode), y_tr,
                                model.combine(blocks_te[mode], mode), y_te, c.probe, c.seed, num_classes)
    return model, combine, metrics, routes_te


def train_cascade(config: CascadeConfig) -> CascadeResult:
    """Train a cascade end to end and write ``<out>/cascade.mask`` and ``<out>/cascade.json``.

    Stages resume: the dispatcher and expert runs live in ``<out>/dispatcher`` and
    ``<out>/expert<k>`` and are continued (or reused when finished) on a second call.

    Returns:
        A :class:`CascadeResult`.
    """
    from ..backbones import load_backbone
    from ..data import load_dataset

    c = config
    dtype, router_dtype = _check(c)
    main = distributed.is_main()  # under torchrun the runs use DDP; only rank 0 logs and writes
    log = _echo(c.quiet or not main)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    disp, dcfg = _dispatcher_stage(c, out, log)
    bb = load_backbone(dcfg.backbone, weights=dcfg.backbone_weights)
    data = load_dataset(dcfg.dataset, image_size=dcfg.image_size, data_dir=dcfg.data_dir,
                        download=dcfg.download, quiet=dcfg.quiet)
    size = int(dcfg.image_size or min(data.native_size, bb.input_size))
    train_idx = c.train_indices if c.train_indices is not None else (
        dcfg.train_indices if dcfg.train_indices is not None else list(range(len(data.train))))
    t_disp = time.perf_counter() - t0
    d_model = _model_of(bb, disp)
    (d_tr,), y_tr = _features([d_model], data.train, train_idx, size, bb)
    router = fit_router(d_tr, n_experts=c.experts, dim=c.router_dim, seed=c.seed, dtype=router_dtype,
                        bits=c.mantissa_bits)
    routes_tr = distributed.broadcast_(CascadeModel(d_model, [], router, {}).route_features(d_tr))
    sizes = _check_clusters(routes_tr, c.experts)  # every rank trains the same experts
    log(f"router: PCA {router['pca_components'].shape[0]} dims + {c.experts}-way GMM, cluster sizes {sizes}")
    experts = _experts_stage(c, out, disp, dcfg, train_idx, routes_tr, log)
    t_train = time.perf_counter() - t0
    e_models = [_model_of(bb, e) for e in experts]
    e_tr, _ = _features(e_models, data.train, train_idx, size, bb)
    test_f, y_te = _features([d_model, *e_models], data.test, None, size, bb)
    model, combine, metrics, routes_te = _combine_stage(c, d_model, e_models, router, d_tr, e_tr, routes_tr,
                                                        test_f, y_tr, y_te, data.num_classes, dtype, log)
    meta = {"backbone": dcfg.backbone, "dataset": dcfg.dataset, "image_size": str(size),
            "mean": json.dumps(list(bb.mean)), "std": json.dumps(list(bb.std)),
            "mask.scale": "true" if dcfg.scale else "false", "objective": dcfg.objective,
            "cluster_sizes": json.dumps(sizes), "metrics": json.dumps(metrics)}
    path = out / "cascade.mask"
    storage = {} if not main else save_cascade(path, bb, disp.masks, disp.extras, [e.masks for e in experts],
                                               [e.extras for e in experts], router, combine,
                                               combine_kind=c.combine, metadata=meta)
    info = {"command_config": _config_json(c), "dispatcher_config": dcfg.to_dict(), "cluster_sizes": sizes,
            "test_cluster_sizes": torch.bincount(routes_te, minlength=c.experts).tolist(),
            "dispatcher_steps": disp.steps, "expert_steps": [e.steps for e in experts], "metrics": metrics,
            "storage": storage, "seconds": {"dispatcher": t_disp, "training": t_train,
                                            "total": time.perf_counter() - t0}, "file": str(path)}
    if main:
        io.write_text(out / "cascade.json", json.dumps(info, indent=2) + "\n")
    distributed.barrier()
    return CascadeResult(model, path, sizes, metrics, storage, info)


# ============================================================================ evaluation


def evaluate_cascade(path: str | os.PathLike, *, backbone: str | None = None, dataset: str | None = None,
                     image_size: int | None = None, fractions=(1.0,), knn: bool = True, probe: bool = True,
                     baseline: bool = True, data_dir: str | None = None, download: bool | None = None,
                     batch_size: int = 256, seed: int = 0) -> dict[str, dict[str, float]]:
    """k-NN / probe of a stored cascade's dispatcher and each stored mode (and the plain backbone).

    Features are the loaded :class:`CascadeModel`'s outputs on clean images (CPU): the memory
    bank / probe is fitted on the train split and tested on the test split, as
    :func:`maskpack.evaluate.evaluate` does for single tasks.

    Returns:
        ``{"backbone": {...}, "dispatcher": {...}, "<mode>": {...}}`` with keys ``knn@F``, ``probe@F``.
    """
    from ..backbones import load_backbone
    from ..data import Augmented, eval_transform, load_dataset, make_loader
    from ..evaluate import evaluate_features, extract_features

    p = Path(path)
    mf, _, _ = read_cascade(p / "cascade.mask" if p.is_dir() else p)
    meta = mf.metadata
    bb = load_backbone(backbone or meta.get("backbone") or mf.backbone_name)
    model = load_cascade(path, bb)
    size = image_size or int(meta.get("image_size", "32"))
    data = load_dataset(dataset or meta.get("dataset", "digits"), image_size=size, data_dir=data_dir,
                        download=download)
    tf = eval_transform(size, bb.mean, bb.std)
    models: dict[str, nn.Module] = {}
    if baseline:
        models["backbone"] = TaskModel(bb.copy_model())
    models["dispatcher"] = model.dispatcher
    models.update({mode: _Mode(model, mode) for mode in model.modes})
    feats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in models}
    for ds in (data.train, data.test):
        loader = make_loader(Augmented(ds, tf), batch_size=batch_size)
        for name, m in models.items():
            feats[name].append(extract_features(m, loader, device="cpu", amp=False))
    return {name: evaluate_features(f_tr, y_tr, f_te, y_te, fractions=fractions, knn=knn, probe=probe,
                                    seed=seed, num_classes=data.num_classes)
            for name, ((f_tr, y_tr), (f_te, y_te)) in feats.items()}


class _Mode(nn.Module):
    """A cascade fixed to one mode (for :func:`maskpack.evaluate.extract_features`)."""

    def __init__(self, cascade: CascadeModel, mode: str):
        super().__init__()
        self.cascade, self.m = cascade, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cascade(x, self.m)
