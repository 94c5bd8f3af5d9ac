"""Cascades: a self-supervised dispatcher mask, an unsupervised router, one expert mask per cluster.

The paper's model cascade (Warmerdam et al., "Self-Masking Networks"), see docs/cascade.md:

1. **Dispatcher**: a SwAV mask over the frozen backbone (trained here, or taken from a run).
2. **Router**: the dispatcher's features of the training set, PCA to 20 dimensions, then a
   K-way Gaussian mixture (scikit-learn, seeded). Prediction is re-implemented in torch
   (float64), so a loaded cascade routes without scikit-learn and exactly like the trained one.
3. **Experts**: per cluster, a mask initialised from the dispatcher's scores (and SwAV head),
   trained on that cluster's images for about the dispatcher's number of steps.
4. **Combination**: ``unconditional`` concatenates ``[D, E1..EK]`` (K+1 forward passes);
   ``conditional`` keeps only the routed expert's block, the others zero (2 passes). Either is
   projected back to the dispatcher's width by a whitened PCA fitted on the training set.
5. **Storage**: one ``.mask`` container (codec ``ans``): the dispatcher's masks under their own
   names, each expert as the XOR of its mask with the dispatcher's (``expert<k>/<name>``), coded
   with the same backbone-conditioned entropy coder; router, combination and BatchNorm
   statistics in the safetensors extras blob (no pickle anywhere).

Example:
    >>> from maskpack.cascade import CascadeConfig, train_cascade, load_cascade
    >>> result = train_cascade(CascadeConfig(dispatcher="runs/swav", out="runs/cascade"))  # doctest: +SKIP
    >>> model = load_cascade("runs/cascade/cascade.mask", load_backbone())                 # doctest: +SKIP
    >>> emb = model(images)                      # (N, 1280), routed, unconditional by default
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import BackboneMismatchError, ConfigError, DataError, FormatError
from .model import TaskModel

FORMAT = "maskpack-cascade"
FORMAT_VERSION = "1"
MODES = ("unconditional", "conditional")
CODEC = "ans"
Log = Callable[[str], None]


# ============================================================================ the module


class CascadeModel(nn.Module):
    """Embeds images with a dispatcher, a router and K experts.

    Args:
        dispatcher: the dispatcher's :class:`TaskModel` (eval mode, baked weights).
        experts: K expert :class:`TaskModel` s.
        router: float64 tensors ``pca_mean`` (F,), ``pca_components`` (P, F), ``gmm_means``
            (K, P), ``gmm_precisions_cholesky`` (K, P, P), ``gmm_weights`` (K,).
        combine: per mode, ``mean`` (C,) float32, ``components`` (W, C) float16/32 and
            ``scale`` (W,) float32 (``1 / sqrt(explained variance)``); C = (K + 1) * F.
        mode: the default mode of :meth:`forward`.

    Forward: ``(N, 3, H, W)`` normalised images -> ``(N, W)`` embeddings. The module does no
    training-time work: everything is a fixed function of the stored tensors, so a cascade
    saved and loaded gives ``torch.equal`` embeddings.
    """

    def __init__(self, dispatcher: TaskModel, experts: list[TaskModel], router: dict[str, torch.Tensor],
                 combine: dict[str, dict[str, torch.Tensor]], mode: str | None = None):
        super().__init__()
        self.dispatcher = dispatcher.eval()
        self.experts = nn.ModuleList(e.eval() for e in experts)
        self.router = {k: v.detach().to(torch.float64) for k, v in router.items()}
        self.combine_params = {m: {k: v.detach() for k, v in p.items()} for m, p in combine.items()}
        # The forward pass uses float32 copies of the stored projection (exact for float16 input).
        self._proj = {m: (p["mean"].float(), p["components"].float().t().contiguous(), p["scale"].float())
                      for m, p in self.combine_params.items()}
        prec = self.router["gmm_precisions_cholesky"]  # (K, P, P)
        self._log_det = torch.log(torch.diagonal(prec, dim1=1, dim2=2)).sum(1)  # (K,)
        self._mu_prec = torch.einsum("kp,kpq->kq", self.router["gmm_means"], prec)  # (K, P)
        self.mode = mode or next(iter(self.combine_params), "unconditional")
        self.requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # Router and projection tensors are plain dicts (fixed dtypes: float64 routing); follow the
        # dispatcher's device on .to()/.cuda() but never change their dtype.
        super()._apply(fn, recurse)
        dev = next(self.dispatcher.parameters()).device
        self.router = {k: v.to(dev) for k, v in self.router.items()}
        self._proj = {m: tuple(t.to(dev) for t in p) for m, p in self._proj.items()}
        self._log_det, self._mu_prec = self._log_det.to(dev), self._mu_prec.to(dev)
        return self

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.combine_params)

    @property
    def feature_dim(self) -> int:
        """Width of the dispatcher's (and each expert's) features."""
        return int(self.router["pca_mean"].numel())

    def embed_dim(self, mode: str | None = None) -> int:
        return int(self._proj[self._mode(mode)][1].shape[1])

    def _mode(self, mode: str | None) -> str:
        mode = mode or self.mode
        if mode not in self.combine_params:
            raise ConfigError(f"this cascade has no {mode!r} combination; it has {list(self.combine_params)}")
        return mode

    # -- routing -------------------------------------------------------------------------------

    @torch.no_grad()
    def route_features(self, d: torch.Tensor) -> torch.Tensor:
        """Cluster index (N,) int64 of dispatcher features ``d`` (N, F): the GMM's argmax."""
        r = self.router
        y = (d.to(torch.float64) - r["pca_mean"]) @ r["pca_components"].t()  # (N, P)
        z = torch.einsum("np,kpq->nkq", y, r["gmm_precisions_cholesky"]) - self._mu_prec  # (N, K, P)
        p = y.shape[1]
        log_prob = -0.5 * (p * math.log(2 * math.pi) + (z * z).sum(2)) + self._log_det  # (N, K)
        return (log_prob + torch.log(r["gmm_weights"])).argmax(1)

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster index (N,) of images ``x`` (one dispatcher pass)."""
        return self.route_features(self.dispatcher.features(x).float())

    # -- combination ---------------------------------------------------------------------------

    @torch.no_grad()
    def combine(self, blocks: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Whitened PCA of concatenated blocks ``(N, (K+1)*F)`` -> ``(N, W)``."""
        mean, comp_t, scale = self._proj[self._mode(mode)]
        return ((blocks.float() - mean) @ comp_t) * scale

    @staticmethod
    def conditional_blocks(blocks: list[torch.Tensor], routes: torch.Tensor) -> torch.Tensor:
        """``[D, E1..EK]`` with every expert block zeroed except the routed one: (N, (K+1)*F)."""
        d, experts = blocks[0], blocks[1:]
        out = [d] + [torch.where((routes == k)[:, None], e, torch.zeros_like(e))
                     for k, e in enumerate(experts)]
        return torch.cat(out, 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        mode = self._mode(mode)
        d = self.dispatcher.features(x).float()  # (N, F)
        if mode == "unconditional":  # K + 1 passes
            blocks = torch.cat([d] + [e.features(x).float() for e in self.experts], 1)
            return self.combine(blocks, mode)
        routes = self.route_features(d)  # conditional: 2 passes, each image through its expert only
        blocks = [d] + [torch.zeros_like(d) for _ in self.experts]
        for k, expert in enumerate(self.experts):
            sel = (routes == k).nonzero().flatten()
            if sel.numel():
                blocks[k + 1] = blocks[k + 1].index_copy(0, sel, expert.features(x[sel]).float())
        return self.combine(torch.cat(blocks, 1), mode)


# ============================================================================ fitting (sklearn)


def fit_router(features: torch.Tensor, *, n_experts: int = 5, dim: int = 20,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """PCA to ``dim`` dimensions + a ``n_experts``-way full-covariance Gaussian mixture.

    Args:
        features: dispatcher features of the training set (N, F).
        n_experts: mixture components (clusters).
        dim: PCA dimensions (capped at ``min(N - 1, F)``).
        seed: the mixture's ``random_state`` (PCA uses the exact, deterministic solver).

    Returns:
        The router tensors of :class:`CascadeModel` (float64).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = features.detach().to(torch.float64).numpy()
    n, f = x.shape
    if n_experts < 1:
        raise ConfigError(f"a cascade needs at least one expert, got {n_experts}")
    if n < 2 * n_experts:
        raise DataError(f"{n} training images cannot be split into {n_experts} clusters: use fewer experts")
    dim = max(1, min(dim, n - 1, f))
    pca = PCA(n_components=dim, svd_solver="full").fit(x)
    out = {"pca_mean": torch.from_numpy(pca.mean_.copy()),
           "pca_components": torch.from_numpy(pca.components_.copy())}
    y = (torch.from_numpy(x) - out["pca_mean"]) @ out["pca_components"].t()  # the torch projection
    gmm = GaussianMixture(n_components=n_experts, covariance_type="full", random_state=seed,
                          max_iter=200, reg_covar=1e-6).fit(y.numpy())
    out.update(gmm_means=torch.from_numpy(gmm.means_.copy()),
               gmm_precisions_cholesky=torch.from_numpy(gmm.precisions_cholesky_.copy()),
               gmm_weights=torch.from_numpy(gmm.weights_.copy()))
    return out


def fit_combination(blocks: torch.Tensor, *, width: int, seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Whitened PCA of training embeddings ``blocks`` (N, C) to ``width`` dimensions.

    The width is capped at the data's rank (``N - 1``) and components with a variance below
    1e-9 of the largest are dropped (whitening would divide by ~0). ``components`` are stored
    in ``dtype`` (float16 halves the file; the cascade always uses the stored values).
    """
    from sklearn.decomposition import PCA

    x = blocks.detach().to(torch.float64).numpy()
    n, c = x.shape
    width = max(1, min(width, n - 1, c))
    pca = PCA(n_components=width, whiten=True, svd_solver="auto", random_state=seed).fit(x)
    var = pca.explained_variance_
    keep = int(np.count_nonzero(var > var[0] * 1e-9)) if var.size and var[0] > 0 else 0
    if keep == 0:
        raise DataError("the training embeddings have no variance: cannot fit the combination PCA")
    return {"mean": torch.from_numpy(pca.mean_.astype(np.float32)),
            "components": torch.from_numpy(pca.components_[:keep].copy()).to(dtype),
            "scale": torch.from_numpy((1.0 / np.sqrt(var[:keep])).astype(np.float32))}


# ============================================================================ training


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
        combine_dtype: ``float16`` or ``float32`` for the stored combination PCA components.
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
    modes: tuple[str, ...] = MODES
    combine_dtype: str = "float16"
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
    from .train import TrainConfig

    base = dict(dataset="digits", objective="swav", method="mask", image_size=32, epochs=4,
                eval_every=0, eval_knn="never")
    base.update(overrides)
    for key in ("swav_crops", "swav_global_scale", "swav_local_scale"):  # JSON gives lists
        if isinstance(base.get(key), list):
            base[key] = tuple(base[key])
    return TrainConfig(**base)


def _run_dir_task(out: Path, config, init_scores=None, callbacks=()) -> _Task:
    """Train (or finish / reuse) the run in ``out``: resumes when a checkpoint is there."""
    from .train import run

    resume = (out / "checkpoint.pt").exists()
    config = dataclasses.replace(config, out=str(out), resume=resume)
    r = run(config, callbacks if not resume else (), init_scores=None if resume else init_scores)
    if not r.history:
        raise ConfigError(f"{out}: the run holds no finished epoch")
    steps = int(r.history[-1]["step"])
    obj = {k: v.detach().cpu().clone() for k, v in r.objective.state_dict().items()}
    return _Task(r.masks, r.scores, r.extras, r.config, steps, obj)


def load_dispatcher(path: str | os.PathLike) -> _Task:
    """A finished dispatcher from a run directory, its ``checkpoint.pt``, or a ``.mask`` file."""
    from .masking import masks_from_scores
    from .train import TrainConfig, load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.exists():
        raise FileNotFoundError(2, "No such file", str(p))
    if p.suffix == ".mask":
        from .io import read

        mf = read(p)
        if mf.metadata.get("cascade.format"):
            raise FormatError(f"{p} is already a cascade; give the dispatcher's own run or .mask file")
        keys = ("backbone", "dataset", "image_size", "method", "objective")
        cfg = default_train_config(**{k: mf.metadata[k] for k in keys if k in mf.metadata})
        cfg.image_size = int(cfg.image_size)
        from .backbones import load_backbone

        masks = mf.masks(load_backbone(mf.backbone_name))
        return _Task(masks, None, mf.extras, cfg, int(mf.metadata.get("steps", "0") or 0),
                     metadata=dict(mf.metadata))
    ckpt = load_checkpoint(p)
    cfg = TrainConfig.from_dict(json.loads(ckpt["config"]))
    if int(ckpt["epoch"]) < cfg.epochs:
        raise ConfigError(f"dispatcher {p} stopped at epoch {ckpt['epoch']} of {cfg.epochs}: finish it "
                          f"first (maskpack train --resume --out {p.parent})")
    masks = masks_from_scores(ckpt["scores"], mode=ckpt.get("mask_mode", "threshold"),
                              threshold=float(ckpt.get("threshold", 0.0)), k=float(ckpt.get("k", 0.9)))
    return _Task(masks, ckpt["scores"], ckpt["extras"], cfg, int(ckpt["step"]), ckpt.get("objective"),
                 dict(ckpt.get("metadata") or {}))


def _scores_from_masks(masks: dict[str, torch.Tensor], init: float) -> dict[str, torch.Tensor]:
    return {k: torch.where(m, torch.tensor(init), torch.tensor(-init)).float() for k, m in masks.items()}


def _expert_config(disp, indices: list[int], steps: int, seed: int):
    """The dispatcher's config on one cluster, with enough epochs for ~``steps`` steps."""
    n, b = len(indices), disp.batch_size
    per_epoch = max(1, n // b) if n >= b else 1
    if disp.max_steps_per_epoch:
        per_epoch = min(per_epoch, disp.max_steps_per_epoch)
    epochs = max(1, int(round(steps / per_epoch)))
    warm = None  # same fraction of the schedule as the dispatcher's warm-up
    if isinstance(disp.warmup, (int, float)):
        warm = float(disp.warmup) / max(disp.epochs, 1) * epochs
    # the expert starts from the dispatcher's trained SwAV head: no head-only phase
    return dataclasses.replace(disp, train_indices=list(indices), epochs=epochs, warmup=warm,
                               head_only_epochs=0.0,
                               eval_every=0, eval_knn="never", probe=False, stop_after=None,
                               resume=False, seed=seed), epochs * per_epoch


def _load_objective(state: dict[str, torch.Tensor] | None):
    """A ``train_start`` callback that starts the expert's SwAV head from the dispatcher's."""

    def cb(event: str, info: dict[str, Any]) -> None:
        if event == "train_start" and state:
            # Projection and prototypes only: the queue holds other clusters' features.
            obj = info["run"].objective
            own = obj.state_dict()
            params = {k: v for k, v in state.items() if not k.startswith("queue")}
            if set(params) <= set(own) and all(own[k].shape == v.shape for k, v in params.items()):
                obj.load_state_dict(params, strict=False)

    return cb


def _model_of(backbone, task: _Task) -> TaskModel:
    from .rehydrate import rehydrate

    scale = getattr(task.config, "scale", True)
    return rehydrate(backbone, task.masks, task.extras, scale=scale)


def _features(models: list[TaskModel], dataset, indices, size: int, backbone, batch_size: int = 256):
    """Features of every model on the images (clean eval transform): list of (N, F), labels (N,)."""
    from .data import Augmented, eval_transform, make_loader
    from .evaluate import extract_features

    loader = make_loader(Augmented(dataset, eval_transform(size, backbone.mean, backbone.std), indices),
                         batch_size=batch_size)
    feats, labels = [], None
    for m in models:
        f, labels = extract_features(m, loader, device="cpu", amp=False)
        feats.append(f)
    return feats, labels


def _scores(train_f, y_tr, test_f, y_te, probe: bool, seed: int, num_classes: int, *,
            knn: bool = True) -> dict[str, float]:
    from .evaluate import knn_accuracy, linear_probe

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


def train_cascade(config: CascadeConfig) -> CascadeResult:
    """Train a cascade end to end and write ``<out>/cascade.mask`` and ``<out>/cascade.json``.

    Stages resume: the dispatcher and expert runs live in ``<out>/dispatcher`` and
    ``<out>/expert<k>`` and are continued (or reused when finished) on a second call.

    Returns:
        A :class:`CascadeResult`.
    """
    from .backbones import load_backbone
    from .data import load_dataset

    c = config
    if c.experts < 1:
        raise ConfigError(f"--experts must be at least 1, got {c.experts}")
    bad = [m for m in c.modes if m not in MODES]
    if bad or not c.modes:
        raise ConfigError(f"unknown combination mode(s) {bad}: use {', '.join(MODES)}")
    dtype = _dtype(c.combine_dtype)
    from . import distributed

    main = distributed.is_main()  # under torchrun the runs use DDP; only rank 0 logs and writes
    log = _echo(c.quiet or not main)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # 1. dispatcher
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
        dcfg = dataclasses.replace(dcfg, threads=c.train.threads, device=c.train.device)
    bb = load_backbone(dcfg.backbone)
    data = load_dataset(dcfg.dataset, image_size=dcfg.image_size, data_dir=dcfg.data_dir)
    size = int(dcfg.image_size or min(data.native_size, bb.input_size))
    train_idx = c.train_indices if c.train_indices is not None else (
        dcfg.train_indices if dcfg.train_indices is not None else list(range(len(data.train))))
    t_disp = time.perf_counter() - t0
    # 2. router on the dispatcher's training features
    d_model = _model_of(bb, disp)
    (d_tr,), y_tr = _features([d_model], data.train, train_idx, size, bb)
    router = fit_router(d_tr, n_experts=c.experts, dim=c.router_dim, seed=c.seed)
    probe_model = CascadeModel(d_model, [], router, {})
    routes_tr = distributed.broadcast_(probe_model.route_features(d_tr))  # every rank trains the same experts
    sizes = _check_clusters(routes_tr, c.experts)
    log(f"router: PCA {router['pca_components'].shape[0]} dims + {c.experts}-way GMM, cluster sizes {sizes}")
    # 3. experts
    steps = c.expert_steps or disp.steps or dcfg.epochs * max(1, len(train_idx) // dcfg.batch_size)
    init = disp.scores if disp.scores is not None else _scores_from_masks(disp.masks, dcfg.score_init)
    experts, expert_steps = [], []
    for k in range(c.experts):
        idx = [train_idx[i] for i in (routes_tr == k).nonzero().flatten().tolist()]
        ecfg, n_steps = _expert_config(dcfg, idx, steps, dcfg.seed)
        log(f"expert {k + 1}/{c.experts}: {len(idx)} images, {ecfg.epochs} epochs (~{n_steps} steps)")
        experts.append(_run_dir_task(out / f"expert{k + 1}", ecfg, init, [_load_objective(disp.objective)]))
        expert_steps.append(experts[-1].steps)
    t_train = time.perf_counter() - t0
    # 4. combination on the training set; evaluation on the test split
    e_models = [_model_of(bb, e) for e in experts]
    e_tr, _ = _features(e_models, data.train, train_idx, size, bb)
    test_f, y_te = _features([d_model, *e_models], data.test, None, size, bb)
    combine = {}
    blocks_tr = {"unconditional": torch.cat([d_tr, *e_tr], 1),
                 "conditional": CascadeModel.conditional_blocks([d_tr, *e_tr], routes_tr)}
    for mode in c.modes:
        combine[mode] = fit_combination(blocks_tr[mode], width=d_tr.shape[1], seed=c.seed, dtype=dtype)
    model = CascadeModel(d_model, e_models, router, combine, mode=c.modes[0])
    routes_te = model.route_features(test_f[0])
    blocks_te = {"unconditional": torch.cat(test_f, 1),
                 "conditional": CascadeModel.conditional_blocks(test_f, routes_te)}
    log("evaluating: k-NN" + (" and linear probe" if c.probe else ""))
    metrics = {"dispatcher": _scores(d_tr, y_tr, test_f[0], y_te, c.probe, c.seed, data.num_classes)}
    # Control: the dispatcher's own features through the same whitened PCA (no experts), to tell
    # what whitening alone does from what the experts add.
    white = CascadeModel(d_model, [], router, {"unconditional": fit_combination(
        d_tr, width=d_tr.shape[1], seed=c.seed, dtype=dtype)})
    metrics["dispatcher_whitened"] = _scores(white.combine(d_tr), y_tr, white.combine(test_f[0]), y_te,
                                             c.probe, c.seed, data.num_classes)
    for mode in c.modes:
        metrics[mode] = _scores(model.combine(blocks_tr[mode], mode), y_tr,
                                model.combine(blocks_te[mode], mode), y_te, c.probe, c.seed,
                                data.num_classes)
    # 5. storage
    meta = {"backbone": dcfg.backbone, "dataset": dcfg.dataset, "image_size": str(size),
            "mean": json.dumps(list(bb.mean)), "std": json.dumps(list(bb.std)),
            "mask.scale": "true" if dcfg.scale else "false", "objective": dcfg.objective,
            "cluster_sizes": json.dumps(sizes), "metrics": json.dumps(metrics)}
    path = out / "cascade.mask"
    storage = {} if not main else save_cascade(path, bb, disp.masks, disp.extras, [e.masks for e in experts],
                           [e.extras for e in experts], router, combine, metadata=meta)
    info = {"command_config": _config_json(c), "dispatcher_config": dcfg.to_dict(), "cluster_sizes": sizes,
            "test_cluster_sizes": torch.bincount(routes_te, minlength=c.experts).tolist(),
            "dispatcher_steps": disp.steps, "expert_steps": expert_steps, "metrics": metrics,
            "storage": storage, "seconds": {"dispatcher": t_disp, "training": t_train,
                                            "total": time.perf_counter() - t0}, "file": str(path)}
    if main:
        (out / "cascade.json").write_text(json.dumps(info, indent=2) + "\n")
    distributed.barrier()
    return CascadeResult(model, path, sizes, metrics, storage, info)


def _config_json(c: CascadeConfig) -> dict[str, Any]:
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name != "train"}
    d["modes"] = list(c.modes)
    d["train"] = c.train.to_dict() if c.train is not None else None
    return d


def _dtype(name: str) -> torch.dtype:
    table = {"float16": torch.float16, "float32": torch.float32}
    if name not in table:
        raise ConfigError(f"combine dtype {name!r}: use float16 or float32")
    return table[name]


# ============================================================================ storage


def _absw(w: torch.Tensor) -> np.ndarray:
    return w.detach().to("cpu", torch.float32).abs().reshape(-1).numpy()


def _weights(backbone) -> dict[str, torch.Tensor]:
    module = getattr(backbone, "model", backbone)
    out = dict(module.named_buffers())
    out.update(module.named_parameters())
    return out


def _expert_extras(disp: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expert's extras that differ from the dispatcher's (the rest are stored once)."""
    def same(k: str, v: torch.Tensor) -> bool:
        d = disp.get(k)
        return d is not None and d.dtype == v.dtype and d.shape == v.shape and torch.equal(d, v)

    return {k: v for k, v in expert.items() if not same(k, v)}


def save_cascade(path: str | os.PathLike, backbone, dispatcher_masks: dict[str, torch.Tensor],
                 dispatcher_extras: dict[str, torch.Tensor], expert_masks: list[dict[str, torch.Tensor]],
                 expert_extras: list[dict[str, torch.Tensor]], router: dict[str, torch.Tensor],
                 combine: dict[str, dict[str, torch.Tensor]], *,
                 metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Write a cascade as one ``.mask`` container (layout: docs/cascade.md).

    Returns:
        The storage report (bytes of each part and the cost as a multiple of one mask),
        see :func:`storage_report`.
    """
    from safetensors.torch import save as st_save

    from .storage import container
    from .storage.codecs import get_codec
    from .storage.entropy import TensorContexts

    cod = get_codec(CODEC)
    weights = _weights(backbone)
    names = [n for n in weights if n in dispatcher_masks]  # backbone order: deterministic bytes
    if set(names) != set(dispatcher_masks):
        raise FormatError(f"dispatcher mask {sorted(set(dispatcher_masks) - set(names))[0]!r} names no "
                          "backbone tensor")
    entries, sizes = [], {"dispatcher": 0, "experts": [0] * len(expert_masks)}
    for name in names:
        ctx = TensorContexts(_absw(weights[name]))
        d = dispatcher_masks[name].cpu().reshape(-1).numpy()
        payload = cod.encode(d, ctx)
        entries.append((name, tuple(dispatcher_masks[name].shape), int(d.sum()), payload))
        sizes["dispatcher"] += len(payload)
        for k, em in enumerate(expert_masks):
            if set(em) != set(dispatcher_masks):
                raise FormatError(f"expert {k + 1} masks other tensors than the dispatcher")
            delta = d ^ em[name].cpu().reshape(-1).numpy()
            payload = cod.encode(delta, ctx)
            entries.append((f"expert{k + 1}/{name}", tuple(em[name].shape), int(delta.sum()), payload))
            sizes["experts"][k] += len(payload)
    tensors = {f"dispatcher/{k}": v for k, v in dispatcher_extras.items()}
    for k, ex in enumerate(expert_extras):
        tensors.update({f"expert{k + 1}/{n}": v for n, v in _expert_extras(dispatcher_extras, ex).items()})
    tensors.update({f"router/{k}": v for k, v in router.items()})
    for mode, params in combine.items():
        tensors.update({f"combine/{mode}/{k}": v for k, v in params.items()})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"cascade.format": FORMAT, "cascade.version": FORMAT_VERSION,
                 "cascade.experts": str(len(expert_masks)), "cascade.modes": ",".join(combine)})
    bb_name = getattr(backbone, "name", type(getattr(backbone, "model", backbone)).__name__)
    bb_hash = backbone.hash() if callable(getattr(backbone, "hash", None)) else _hash(backbone)
    data = container.build(backbone_name=bb_name, backbone_hash=bb_hash, codec=CODEC, tensors=entries,
                           extras=st_save(tensors), metadata=meta)
    container.write_atomic(path, data)
    # the same file without the combination PCAs (built, not written): extras are compressed as
    # one blob, so the PCAs' share of the file can only be measured this way
    rest = {k: v for k, v in tensors.items() if not k.startswith("combine/")}
    without = len(container.build(backbone_name=bb_name, backbone_hash=bb_hash, codec=CODEC,
                                  tensors=entries, extras=st_save(rest), metadata=meta))
    return storage_report(path, backbone, dispatcher_masks, dispatcher_extras, expert_masks, expert_extras,
                          sizes, tensors, len(data), without)


def _hash(backbone) -> str:
    from .backbones.hashing import backbone_hash

    return backbone_hash(getattr(backbone, "model", backbone))


def _nbytes(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefix))


def storage_report(path, backbone, dispatcher_masks, dispatcher_extras, expert_masks, expert_extras,
                   sizes: dict[str, Any], tensors: dict[str, torch.Tensor],
                   file_bytes: int, file_bytes_without_combine: int) -> dict[str, Any]:
    """Bytes of each part of a cascade file and multiples of one mask.

    ``one_mask`` is the dispatcher's masks coded with ``ans``; ``experts_independent`` codes
    each expert's mask on its own with the same coder (what storing separate ``.mask`` files
    would cost), for comparison with the XOR deltas actually stored.
    """
    from .io import save
    from .storage.codecs import get_codec
    from .storage.entropy import TensorContexts

    cod, weights = get_codec(CODEC), _weights(backbone)
    indep = []
    for em in expert_masks:
        indep.append(sum(len(cod.encode(em[n].cpu().reshape(-1).numpy(), TensorContexts(_absw(weights[n]))))
                         for n in em))
    one = max(sizes["dispatcher"], 1)
    tmp = Path(path).with_name(f".{Path(path).name}.dispatcher.tmp")
    try:  # the dispatcher alone as an ordinary task file, for the whole-file multiple
        save(tmp, dispatcher_masks, backbone, extras=dispatcher_extras, codec=CODEC)
        task_file = tmp.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)
    deltas = sum(sizes["experts"])
    flips = [sum(int((dispatcher_masks[n] ^ em[n]).sum()) for n in em) for em in expert_masks]
    numel = sum(m.numel() for m in dispatcher_masks.values())
    return {
        "file_bytes": file_bytes, "dispatcher_task_file_bytes": task_file,
        "one_mask_bytes": sizes["dispatcher"], "expert_delta_bytes": sizes["experts"],
        "expert_independent_bytes": indep, "expert_flipped_fraction": [f / max(numel, 1) for f in flips],
        "dispatcher_extras_bytes": _nbytes(tensors, "dispatcher/"),
        "expert_extras_bytes": _nbytes(tensors, "expert"),
        "router_bytes": _nbytes(tensors, "router/"), "combine_bytes": _nbytes(tensors, "combine/"),
        "masks_multiple": (sizes["dispatcher"] + deltas) / one,
        "masks_multiple_independent": (sizes["dispatcher"] + sum(indep)) / one,
        "file_multiple": file_bytes / max(task_file, 1),
        "file_bytes_without_combine": file_bytes_without_combine,
        "file_multiple_without_combine": file_bytes_without_combine / max(task_file, 1),
    }


def is_cascade(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``.mask`` file holding a cascade (or a directory with ``cascade.mask``)."""
    from .storage import container

    p = Path(path)
    if p.is_dir():
        p = p / "cascade.mask"
    if not p.is_file():
        return False
    try:
        return container.parse(p).metadata.get("cascade.format") == FORMAT
    except (FormatError, OSError):
        return False


def _read_container(path: Path):
    from .storage import container

    info = container.parse(path)
    meta = info.metadata
    if meta.get("cascade.format") != FORMAT:
        raise FormatError(f"{path} is a .mask file but not a cascade: load it with maskpack.load")
    if meta.get("cascade.version") != FORMAT_VERSION:
        raise FormatError(f"{path}: cascade version {meta.get('cascade.version')!r} is not supported "
                          f"(this maskpack reads {FORMAT_VERSION}): upgrade maskpack")
    if info.codec != CODEC:
        raise FormatError(f"{path}: cascade masks must use codec {CODEC!r}, got {info.codec!r}")
    try:
        k = int(meta.get("cascade.experts", ""))
    except ValueError:
        raise FormatError(f"{path}: metadata 'cascade.experts' must be an integer") from None
    modes = [m for m in meta.get("cascade.modes", "").split(",") if m]
    if k < 1 or not modes or any(m not in MODES for m in modes):
        raise FormatError(f"{path}: bad cascade metadata (experts {k}, modes {modes})")
    return info, k, modes


def _decode_masks(path: Path, info, backbone, k: int):
    from .storage import container
    from .storage.codecs import get_codec
    from .storage.entropy import TensorContexts

    cod, weights = get_codec(CODEC), _weights(backbone)
    container.check_budget(info.tensors, container.default_budget(sum(w.numel() for w in weights.values())),
                           os.fspath(path))
    data = container.read_data(path, info)
    disp: dict[str, torch.Tensor] = {}
    experts: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    ctxs: dict[str, TensorContexts] = {}
    for t in info.tensors:
        prefix, sep, name = t.name.partition("/")
        if not sep:
            prefix, name = "", t.name
        w = weights.get(name)
        if w is None or tuple(w.shape) != t.shape:
            raise FormatError(f"{path}: mask {t.name!r} {list(t.shape)} does not fit the backbone")
        if name not in ctxs:
            ctxs[name] = TensorContexts(_absw(w))
        flat = cod.decode(container.blob(path, data, t, f"tensor {t.name!r}"), t.numel, ctxs[name])
        if int(np.count_nonzero(flat)) != t.active:
            raise FormatError(f"{path}: mask {t.name!r} decodes to {int(np.count_nonzero(flat))} active "
                              f"entries, the header says {t.active}")
        if not prefix:
            disp[name] = flat
            continue
        idx = int(prefix[6:]) - 1 if prefix.startswith("expert") and prefix[6:].isdigit() else -1
        if not 0 <= idx < k or name not in disp:
            raise FormatError(f"{path}: unexpected tensor {t.name!r} "
                              "(expert deltas must follow their dispatcher tensor)")
        experts[idx][name] = flat ^ disp[name]
    for i, e in enumerate(experts):
        if set(e) != set(disp):
            raise FormatError(f"{path}: expert {i + 1} does not cover the dispatcher's {len(disp)} tensors")
    shape = {t.name: t.shape for t in info.tensors}
    as_t = lambda d: {n: torch.from_numpy(v.reshape(shape[n])) for n, v in d.items()}  # noqa: E731
    return as_t(disp), [as_t(e) for e in experts]


def _split_extras(path: Path, info, k: int, modes: list[str]):
    from safetensors.torch import load as st_load

    from .storage import container

    if info.extras is None:
        raise FormatError(f"{path}: a cascade needs its extras (router, combination); the file has none")
    raw = container.decode_extras(container.read_blob(path, info, info.extras, "extras"), info.extras,
                                  os.fspath(path))
    try:
        tensors = st_load(raw)
    except Exception as exc:  # safetensors has its own error types
        raise FormatError(f"{path}: extras are not a valid safetensors blob ({exc})") from exc
    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)}

    disp = group("dispatcher/")
    experts = [{**disp, **group(f"expert{i + 1}/")} for i in range(k)]
    router = group("router/")
    combine = {m: group(f"combine/{m}/") for m in modes}
    _check_params(path, router, combine, k)
    return disp, experts, router, combine


def _check_params(path: Path, router: dict[str, torch.Tensor], combine: dict[str, dict[str, torch.Tensor]],
                  k: int) -> None:
    need = {"pca_mean", "pca_components", "gmm_means", "gmm_precisions_cholesky", "gmm_weights"}
    if set(router) != need:
        raise FormatError(f"{path}: router tensors must be {sorted(need)}, got {sorted(router)}")
    f = router["pca_mean"].shape
    p = router["pca_components"].shape
    ok = (len(f) == 1 and len(p) == 2 and p[1] == f[0] and tuple(router["gmm_means"].shape) == (k, p[0])
          and tuple(router["gmm_precisions_cholesky"].shape) == (k, p[0], p[0])
          and tuple(router["gmm_weights"].shape) == (k,))
    if not ok:
        raise FormatError(f"{path}: router tensors have inconsistent shapes for {k} experts")
    for mode, params in combine.items():
        if set(params) != {"mean", "components", "scale"}:
            raise FormatError(f"{path}: combination {mode!r} needs mean, components and scale")
        c, comp, s = params["mean"].shape, params["components"].shape, params["scale"].shape
        if len(comp) != 2 or c != ((k + 1) * f[0],) or comp[1] != c[0] or s != (comp[0],):
            raise FormatError(f"{path}: combination {mode!r} has inconsistent shapes")


def load_cascade(path: str | os.PathLike, backbone=None, *, mode: str | None = None) -> CascadeModel:
    """Load a cascade file as a :class:`CascadeModel` (eval mode, CPU).

    Args:
        path: a cascade ``.mask`` file (or a directory holding ``cascade.mask``).
        backbone: the :class:`maskpack.Backbone` it was trained on, a registry name, or None for the
            name stored in the file. Its hash is checked.
        mode: ``unconditional`` (K+1 forward passes) or ``conditional`` (2); default: the first
            stored mode.

    Raises:
        FormatError: not a cascade, or a malformed one. BackboneMismatchError: wrong backbone.

    Example:
        >>> cascade = load_cascade("runs/cascade/cascade.mask")   # doctest: +SKIP
        >>> cascade(images).shape                                 # (N, 1280)
    """
    from .rehydrate import rehydrate

    p = Path(path)
    if p.is_dir():
        p = p / "cascade.mask"
    if not p.exists():
        raise FileNotFoundError(2, "No such file", str(p))
    info, k, modes = _read_container(p)
    if backbone is None or isinstance(backbone, str):
        from .backbones import load_backbone

        backbone = load_backbone(backbone or info.backbone_name)
    actual = backbone.hash() if callable(getattr(backbone, "hash", None)) else _hash(backbone)
    if actual != info.backbone_hash:
        raise BackboneMismatchError(
            f"{p} was made for backbone {info.backbone_name!r} (sha256 {info.backbone_hash}), but the given "
            f"backbone has sha256 {actual}: load it with the backbone it was trained on",
            expected=info.backbone_hash, actual=actual, backbone_name=info.backbone_name)
    d_masks, e_masks = _decode_masks(p, info, backbone, k)
    d_extras, e_extras, router, combine = _split_extras(p, info, k, modes)
    scale = info.metadata.get("mask.scale", "true").strip().lower() in ("true", "1")
    disp = rehydrate(backbone, d_masks, d_extras, scale=scale)
    experts = [rehydrate(backbone, m, x, scale=scale) for m, x in zip(e_masks, e_extras, strict=True)]
    model = CascadeModel(disp, experts, router, combine, mode=mode or modes[0])
    model._mode(mode)  # an unknown mode is an error now, not at the first forward
    model.metadata = dict(info.metadata)
    return model


# ============================================================================ evaluation


def evaluate_cascade(path: str | os.PathLike, *, backbone: str | None = None, dataset: str | None = None,
                     image_size: int | None = None, fractions=(1.0,), knn: bool = True, probe: bool = True,
                     baseline: bool = True, data_dir: str | None = None, download: bool = False,
                     batch_size: int = 256, seed: int = 0) -> dict[str, dict[str, float]]:
    """k-NN / probe of a stored cascade's dispatcher and each stored mode (and the plain backbone).

    Features are the loaded :class:`CascadeModel`'s outputs on clean images (CPU): the memory
    bank / probe is fitted on the train split and tested on the test split, as
    :func:`maskpack.evaluate.evaluate` does for single tasks.

    Returns:
        ``{"backbone": {...}, "dispatcher": {...}, "<mode>": {...}}`` with keys ``knn@F``, ``probe@F``.
    """
    from .backbones import load_backbone
    from .data import Augmented, eval_transform, load_dataset, make_loader
    from .evaluate import evaluate_features, extract_features

    p = Path(path)
    info, _, _ = _read_container(p / "cascade.mask" if p.is_dir() else p)
    meta = info.metadata
    bb = load_backbone(backbone or meta.get("backbone") or info.backbone_name)
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
