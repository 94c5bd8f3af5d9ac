"""Training: supervised or SwAV masks (threshold or top-k), and full fine-tuning.

One :class:`TrainConfig` holds every knob; :func:`run` is the one loop. Recipes are named sets
of defaults for the knobs left at ``None`` (``default`` and ``paper``), so a study can change
defaults without touching the loop.

Run directory (``out``):
    * ``config.json``: the resolved config.
    * ``metrics.jsonl``: one JSON object per epoch.
    * ``checkpoint.pt``: written atomically after every epoch; ``torch.load(weights_only=True)``.
    * ``task.mask`` (mask / topk) or ``model.safetensors`` (fft) at the end, written atomically.

Determinism: data order and augmentation depend only on ``(seed, epoch, index)``; head and
projection are initialised from the seed; so on CPU a run stopped after epoch e and resumed
gives bit-identical masks to an uninterrupted run.

Example:
    >>> from maskpack.train import TrainConfig, run
    >>> result = run(TrainConfig(dataset="digits", epochs=2, image_size=32, out="runs/d"))  # doctest: +SKIP
    >>> result.metrics["accuracy"], result.task_path                                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, masking
from .data import (
    Augmented,
    EpochSampler,
    MultiCrop,
    check_fraction,
    eval_transform,
    label_subset,
    load_dataset,
    make_loader,
    supervised_transform,
)
from .errors import ConfigError, DataError, FormatError
from .evaluate import (
    autocast,
    bn_after,
    bn_state,
    evaluate_features,
    extract_features,
    head_accuracy,
    last_bn_name,
    load_bn_state_,
    reestimate_bn_,
    resolve_device,
)
from .model import TaskModel
from .objectives import SupervisedObjective, SwAVObjective, queue_from_global, queue_to_global

CHECKPOINT_VERSION = 1
METHODS = ("mask", "topk", "fft")
# train: every BN layer uses batch statistics while training (re-estimated before evaluation);
# frozen: every BN layer stays in eval mode with the backbone's statistics; head: only the last
# BN layer (the one before the pooled features) trains and is re-estimated, the rest keep the
# backbone's statistics (recipe study, issue 5: frozen Lite0 at 32 px k-NN 0.405 -> 0.494);
# masked: the BN layer right after each masked layer adapts, the rest keep the backbone's statistics
BN_MODES = ("train", "frozen", "head", "masked")
OBJECTIVES = ("supervised", "swav")
_BN = nn.modules.batchnorm._BatchNorm

# What every recipe shares unless it says otherwise.
_COMMON: dict[str, Any] = {
    "head_lr": {"mask": 0.01, "topk": 0.01, "fft": None},  # None: same as lr
    "weight_decay": {"mask": 0.0, "topk": 0.0, "fft": 5e-4},
    "warmup": 1.0,
    "bn_reestimate": True,
    "bn_mode": {"mask": "train", "topk": "train", "fft": "train"},
    "mask_layers": {"mask": "all", "topk": "all", "fft": "all"},
}
# Per-tensor normalised score updates (recipe study, docs/recipe-study.md): Lite0's score gradients
# span ~600x across layers, so one raw lr (the paper's 50) wrecks the first layers while the last
# ones never move; dividing each score tensor's gradient by its mean |g| equalises them, and
# training the BN weight/bias alongside (at the head lr, stored as extras) adds the rest.
# cifar10-5k, 32 px, 8 epochs, BN re-estimated: 0.623 vs fft 0.648 (lr 50: 0.472).
_NORMALIZED: dict[str, Any] = {
    **_COMMON,
    "lr": {"mask": 0.002, "topk": 0.1, "fft": 0.01},
    # per method: top-k keeps the raw scores (its lr 0.1 was not studied with normalisation)
    "score_grad_norm": {"mask": True, "topk": False, "fft": False},
    "train_bn_affine": {"mask": True, "topk": False, "fft": False},
}
# The default (fourth session): the normalised recipe on the last 25 tensors only (Lite0: blocks
# 8-15 and the conv head) with only their BN layers adapting; the early layers keep the
# backbone's weights and ImageNet statistics (BN weight/bias still train everywhere). cifar10-5k,
# 32 px, 8 epochs: 0.645 / 0.654 / 0.640 vs fft 0.648 / 0.621 / 0.645 (seeds 0-2); every layer
# masked with every BN adapting: 0.623 / 0.585.
_LATE: dict[str, Any] = {
    **_NORMALIZED,
    "mask_layers": {"mask": "last:25", "topk": "all", "fft": "all"},
    "bn_mode": {"mask": "masked", "topk": "train", "fft": "train"},
}

# SwAV knobs (objective "swav"): the SwAV paper's settings, which the Self-Masking paper used.
_SWAV_PAPER: dict[str, Any] = {
    "swav_prototypes": 500, "swav_crops": (2, 6), "swav_global_scale": (0.14, 1.0),
    "swav_jitter": 0.8, "swav_blur": True, "head_only_epochs": 0.0,
}
# What works for small images (docs/recipe-study.md "SwAV at 32 px"): with the paper's
# augmentation two views of a 32 px image are hardly closer in Lite0's feature space than two
# different images (cosine 0.27 vs 0.14), so no head gets below ln(K) and the masks take the
# shortcut to a constant output. Milder crops and jitter, no blur, two global crops, a linear
# projection at lr 1, 100 prototypes, the scores frozen for the first quarter of the epochs
# (the head learns first). Masks on the last 13 tensors (Lite0: blocks 12-15 and the conv head)
# with only their BN layers adapting, so the early layers keep the backbone's statistics
# (re-estimating those costs 4-9 k-NN points at 32 px): k-NN 0.405 (frozen) -> 0.536 in 8
# epochs on cifar10-5k; masks on every layer with every BN adapting got 0.399.
_SWAV_SMALL: dict[str, Any] = {
    "swav_prototypes": 100, "swav_crops": (2, 0), "swav_global_scale": (0.5, 1.0),
    "swav_jitter": 0.4, "swav_blur": False, "head_only_epochs": "1/4",
    "lr": {"mask": 0.02}, "head_lr": {"mask": 1.0, "topk": 1.0}, "train_bn_affine": {"mask": False},
    "mask_layers": "last:13", "bn_mode": {"mask": "masked", "topk": "masked"},
}

# Named defaults for knobs left at None. Per-method values are dicts keyed by method; "swav"
# holds the SwAV objective's own (per-method dicts there fall back to the recipe's when a
# method is missing).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {**_LATE, "swav": _SWAV_SMALL},
    # the third session's default: masks on every layer, every BN adapting (SwAV: the default's)
    "normalized": {**_NORMALIZED, "swav": _SWAV_SMALL},
    # The paper's recipe (Warmerdam et al.): lr 50, S0 = 1, mu = 0, BN in train mode, a linear
    # warm-up of 40/150 of the schedule, no BN re-estimation.
    "paper": {**_COMMON, "lr": {"mask": 50.0, "topk": 0.1, "fft": 1e-3}, "warmup": "40/150",
              "bn_reestimate": False, "swav": _SWAV_PAPER},
    # The default until the recipe study: the paper's raw score lr 50 with a 1-epoch warm-up and
    # BN re-estimation. Fine on digits (0.980 vs fft 0.987), 17.6 points under fft on cifar10-5k.
    "lr50": {**_COMMON, "lr": {"mask": 50.0, "topk": 0.1, "fft": 0.01}, "swav": _SWAV_PAPER},
}

# Fields that must match when resuming (the rest are runtime settings or may be extended).
_RESUME_FIXED = ("backbone", "dataset", "objective", "method", "batch_size", "image_size", "labels",
                 "seed", "mask_layers", "mask_bias", "score_init", "threshold", "topk_k", "scale",
                 "detach_alpha", "train_indices", "swav_prototypes", "swav_dim", "swav_hidden",
                 "swav_crops", "swav_queue_length")
_RUNTIME = ("device", "num_workers", "threads", "quiet", "resume", "stop_after", "out", "amp",
            "channels_last", "sync_bn")


@dataclass
class TrainConfig:
    """Every knob of a training run. ``None`` means "from the recipe" (or the dataset)."""

    # what
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None  # local weights file for the backbone (docs/backbones.md)
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    objective: str = "supervised"  # supervised | swav
    method: str = "mask"  # mask | topk | fft
    recipe: str = "default"
    # schedule / optimiser
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # score lr for masks (paper: 50), all weights for fft
    head_lr: float | None = None  # head / projection / prototypes
    weight_decay: float | None = None  # fft weights only: never applied to scores
    head_weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float | str | None = None  # epochs (fractional ok) or "a/b" of the epochs
    schedule: str = "cosine"  # cosine | constant
    head_only_epochs: float | str | None = None  # head first, backbone frozen: epochs or 'a/b' of them
    # data
    image_size: int | None = None  # default: the dataset's size, capped at the backbone's
    labels: float = 1.0  # fraction of training labels (supervised training, k-NN/probe bank)
    train_indices: list[int] | None = None  # train on a subset of the train split
    # masking
    mask_layers: str | None = None  # layer_filter: all, no-stem, last:N, re:REGEX, ...; None: recipe
    mask_bias: bool = False
    score_init: float = 1.0
    threshold: float = 0.0
    topk_k: float = 0.9
    scale: bool = True
    detach_alpha: bool = False
    # batch norm
    bn_mode: str | None = None  # train | frozen | head | masked (BN_MODES); None: the recipe's
    bn_reestimate: bool | None = None  # re-estimate BN stats on clean train images before eval/save
    bn_reestimate_batches: int = 100
    train_bn_affine: bool | None = None  # masks: also train BN weight/bias (saved as extras); None: recipe
    bn_lr: float | None = None  # lr of those BN weight/bias (None: head_lr; never the score lr)
    score_grad_norm: bool | None = None  # masks: divide each score tensor's gradient by its mean |g|
    sync_bn: bool = False  # under torchrun (CUDA): SyncBatchNorm, batch statistics over the global batch
    # SwAV
    swav_dim: int = 128
    swav_hidden: int = 0
    swav_prototypes: int | None = None  # None: the recipe's (default 100, paper 500)
    swav_temperature: float = 0.1
    swav_epsilon: float = 0.05
    swav_sinkhorn_iters: int = 3
    swav_crops: tuple[int, int] | None = None  # (global, local); default (2, 0), paper (2, 6)
    swav_global_scale: tuple[float, float] | None = None  # default (0.5, 1), paper (0.14, 1)
    swav_local_scale: tuple[float, float] = (0.05, 0.14)
    swav_local_size: int | None = None
    swav_jitter: float | None = None  # colour-jitter strength (0: none, no grayscale); default 0.4, paper 0.8
    swav_blur: bool | None = None  # Gaussian blur with p=0.5; default off, paper on
    swav_queue_length: int = 1024
    swav_queue_start: float = 0.2  # fraction of the epochs
    swav_freeze_prototypes_iters: int | None = None  # None: min(313, total steps // 10)
    # evaluation
    eval_every: int = 1  # epochs between test evaluations (0: only at the end)
    eval_knn: str = "end"  # never | end | epoch
    knn_k: int = 200
    knn_temperature: float = 0.1
    probe: bool = False  # logistic-regression probe at the end
    # runtime
    device: str = "auto"
    seed: int = 0
    num_workers: int | None = None  # None: 0 on CPU, up to 8 on CUDA
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    max_steps_per_epoch: int | None = None  # cap (benchmarks); changes the schedule
    stop_after: int | None = None  # stop after this many epochs (budgeted runs; resume later)
    out: str | None = None
    resume: bool = False
    quiet: bool = False
    save_task: bool = True
    codec: str = "ans"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}")
        d = dict(d)
        for k in ("swav_crops", "swav_global_scale", "swav_local_scale"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


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
        out_dir, checkpoint_path, task_path: files written (None without ``out``).
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


Callback = Callable[[str, dict[str, Any]], None]

# ----------------------------------------------------------------------------- config


def _parse_epochs(value: float | str, epochs: int, what: str = "warm-up") -> float:
    """Epochs from ``1.5`` or ``'1.5'``, or a fraction ``'a/b'`` of ``epochs``."""
    if isinstance(value, str):
        if "/" in value:
            a, _, b = value.partition("/")
            try:
                return epochs * float(a) / float(b)
            except (ValueError, ZeroDivisionError) as exc:
                raise ConfigError(f"{what} {value!r}: use epochs (1.5) or a fraction 'a/b'") from exc
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(f"{what} {value!r}: use epochs (1.5) or a fraction 'a/b'") from exc
    return float(value)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check options and fill ``None`` knobs from the recipe. Image size is filled by :func:`run`."""
    c = dataclasses.replace(config)
    if c.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {c.recipe!r}: use one of {sorted(RECIPES)}")
    if c.method not in METHODS:
        raise ConfigError(f"unknown method {c.method!r}: use one of {', '.join(METHODS)}")
    if c.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {c.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if c.schedule not in ("cosine", "constant"):
        raise ConfigError(f"unknown schedule {c.schedule!r}: use 'cosine' or 'constant'")
    if c.eval_knn not in ("never", "end", "epoch"):
        raise ConfigError(f"eval_knn must be never, end or epoch, got {c.eval_knn!r}")
    if c.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {c.epochs}")
    if c.batch_size < 2:
        raise ConfigError(f"batch size must be at least 2 (BatchNorm), got {c.batch_size}")
    if c.image_size is not None and c.image_size < 8:
        raise ConfigError(f"image size must be at least 8 px, got {c.image_size}")
    check_fraction(c.labels)
    if c.method == "topk" and not 0.0 < c.topk_k <= 1.0:
        raise ConfigError(f"topk fraction must be in (0, 1], got {c.topk_k}")
    # One table of defaults: the recipe's, with the SwAV knobs (the paper's SwAV values, which
    # supervised runs store but never use) and, for SwAV runs, the recipe's SwAV overrides merged
    # in (per-method dicts override only the methods they name).
    rec = {k: v for k, v in RECIPES[c.recipe].items() if k != "swav"}
    swav = RECIPES[c.recipe].get("swav", {}) if c.objective == "swav" else {}
    for key, v in {**_SWAV_PAPER, **swav}.items():
        rec[key] = {**rec.get(key, {}), **v} if isinstance(v, dict) else v
    for key in _SWAV_PAPER:
        if getattr(c, key) is None:
            setattr(c, key, rec[key])
    c.head_only_epochs = _parse_epochs(c.head_only_epochs, c.epochs, "head_only_epochs")
    if c.head_only_epochs < 0:
        raise ConfigError(f"head_only_epochs must be >= 0, got {c.head_only_epochs}")
    if c.swav_crops[0] < 2 and c.objective == "swav":
        raise ConfigError("SwAV needs at least 2 global crops")
    if not 0.0 <= c.swav_jitter <= 1.0:
        raise ConfigError(f"swav_jitter (colour-jitter strength) must be in [0, 1], got {c.swav_jitter}")
    for key in ("lr", "head_lr", "weight_decay"):
        if getattr(c, key) is None:
            setattr(c, key, rec[key][c.method])
    if c.head_lr is None:
        c.head_lr = c.lr
    if c.warmup is None:
        c.warmup = rec["warmup"]
    c.warmup = _parse_epochs(c.warmup, c.epochs)
    if c.warmup < 0:
        raise ConfigError(f"warm-up must be >= 0 epochs, got {c.warmup}")
    if c.bn_reestimate is None:
        c.bn_reestimate = rec["bn_reestimate"]
    if c.bn_mode is None:
        v = rec["bn_mode"]
        c.bn_mode = v[c.method] if isinstance(v, dict) else v
    if c.mask_layers is None:
        v = rec["mask_layers"]
        c.mask_layers = v[c.method] if isinstance(v, dict) else v
    if c.bn_mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {c.bn_mode!r}: use one of {', '.join(BN_MODES)}")
    for key in ("score_grad_norm", "train_bn_affine"):
        if getattr(c, key) is None:
            v = rec.get(key, False)
            setattr(c, key, bool(v[c.method] if isinstance(v, dict) else v))
    if c.lr is None or c.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {c.lr}")
    return c


# ----------------------------------------------------------------------------- layer filters


def _is_pointwise(module: nn.Module, name: str) -> bool:
    if isinstance(module, nn.Linear):
        return masking.default_filter(module, name)
    if isinstance(module, nn.Conv2d):
        return masking.default_filter(module, name) and module.kernel_size == (1, 1) and module.groups == 1
    return False


def _not_depthwise(module: nn.Module, name: str) -> bool:
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
        return False
    return masking.default_filter(module, name)


LAYER_FILTERS: dict[str, Callable[[nn.Module, str], bool]] = {
    "all": masking.default_filter,
    "pointwise": _is_pointwise,
    "no-depthwise": _not_depthwise,
}


def layer_filter(spec: str, model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """A mask filter from a name: ``all``, ``pointwise``, ``no-depthwise``, ``no-stem``
    (all but the first masked tensor), ``last`` (only the last one: Lite0's conv head, the
    layer before the pooled features) or ``last:N`` (the last N; Lite0's ``last:13`` is blocks
    12-15 and the conv head), ``no-stem+pointwise`` style combinations, or
    ``re:REGEX`` (parameter names that match)."""
    if spec.startswith("re:"):
        try:
            pat = re.compile(spec[3:])
        except re.error as exc:
            raise ConfigError(f"bad layer regex {spec[3:]!r}: {exc}") from exc
        return lambda m, n: masking.default_filter(m, n) and bool(pat.search(n))
    fns = []
    for part in spec.split("+"):
        if part == "no-stem" or part == "last" or part.startswith("last:"):
            names = [n for n, _, _ in masking.select_parameters(model)]
            if part == "no-stem":
                first = names[0] if names else None
                fns.append(lambda m, n, first=first: masking.default_filter(m, n) and n != first)
            else:
                count = part.partition(":")[2] or "1"
                if not count.isdigit() or int(count) < 1:
                    raise ConfigError(f"bad layer filter {part!r}: use last or last:N with N >= 1")
                keep = set(names[-int(count):])
                fns.append(lambda m, n, keep=keep: masking.default_filter(m, n) and n in keep)
        elif part in LAYER_FILTERS:
            fns.append(LAYER_FILTERS[part])
        else:
            known = sorted(LAYER_FILTERS) + ["last", "last:N", "no-stem", "re:REGEX"]
            raise ConfigError(f"unknown layer filter {part!r}: use one of {known} (join with '+')")
    return lambda m, n: all(f(m, n) for f in fns)


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up then cosine to 0.

    The warm-up starts at ``1 / warmup_steps`` (never a step at lr 0) and reaches 1 at the end
    of the warm-up.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


# ----------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, w)


# ----------------------------------------------------------------------------- the run


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


class _Run:
    """State of one training run (built by :func:`run`)."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[Callback], init_scores):
        from .backbones import load_backbone

        self.callbacks = list(callbacks)
        self.out = Path(config.out) if config.out else None
        ckpt = None
        if config.resume:
            if self.out is None:
                raise ConfigError("--resume needs --out DIR (the run directory to continue)")
            ckpt = load_checkpoint(self.out / "checkpoint.pt")
            _check_resume(config, ckpt)
            saved = TrainConfig.from_dict(json.loads(ckpt["config"]))
            # Knobs left at None take the values the run was started with (not the recipe's).
            config = dataclasses.replace(config, **{
                f.name: getattr(saved, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(config, f.name) is None and getattr(saved, f.name) is not None})
        elif self.out is not None and (self.out / "checkpoint.pt").exists():
            raise ConfigError(f"{self.out} already holds a run (checkpoint.pt): add --resume to continue "
                              "it, or choose another --out")
        c = resolve_config(config)  # bad options fail before anything is loaded
        self.device = resolve_device(c.device)
        # torchrun: join the process group, take cuda:LOCAL_RANK (docs/distributed.md)
        self.dist, self.device = distributed.init(self.device)
        self.per_device_batch = _check_distributed(c, self.dist, self.device)
        if c.threads:
            torch.set_num_threads(c.threads)
        self.cuda = self.device.type == "cuda"
        self.backbone = load_backbone(c.backbone, weights=c.backbone_weights)
        self.data = load_dataset(c.dataset, image_size=c.image_size, data_dir=c.data_dir,
                                 download=c.download)
        if c.image_size is None:
            c.image_size = min(self.data.native_size, self.backbone.input_size)
        self.config = c
        torch.manual_seed(c.seed)
        self._build_model(init_scores)
        self._build_data()
        self._build_optimizer()
        self.epoch, self.step, self.history = 0, 0, []
        if ckpt is not None:
            self._restore(ckpt)
        self.ddp = self._wrap_ddp() if self.dist.enabled else None
        if self.out is not None and self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_text(self.out / "config.json", json.dumps(c.to_dict(), indent=2) + "\n")

    # -- setup ---------------------------------------------------------------------------------

    def _build_model(self, init_scores) -> None:
        c = self.config
        net = self.backbone.copy_model()
        self.masked = c.method in ("mask", "topk")
        if c.bn_mode == "masked" and not self.masked:
            raise ConfigError("--bn-mode masked adapts the BN layers after masked layers: it needs "
                              "--method mask or topk (fft: use --bn-mode train, head or frozen)")
        masked_filter = layer_filter(c.mask_layers, net) if self.masked else None
        # --bn-mode head / masked: the BN layers that adapt (train mode, re-estimated); the rest
        # keep the backbone's statistics
        self.adapt_bn_names: list[str] = []
        if c.bn_mode == "head":
            self.adapt_bn_names = [n for n in [last_bn_name(net)] if n is not None]
        elif c.bn_mode == "masked":
            owners = {n.rpartition(".")[0] for n, _, _ in
                      masking.select_parameters(net, masked_filter, mask_bias=c.mask_bias)}
            self.adapt_bn_names = bn_after(net, owners)
        # a backbone without BatchNorm (ViT, ConvNeXt) has no statistics: every BN mode is the same
        if c.bn_mode in ("head", "masked") and not self.adapt_bn_names and last_bn_name(net) is not None:
            raise ConfigError(f"--bn-mode {c.bn_mode}: backbone {c.backbone!r} has no BatchNorm layer "
                              f"to adapt{' after a masked layer' if c.bn_mode == 'masked' else ''}; "
                              "use --bn-mode train or frozen")
        if self.masked:
            masking.apply_masks_(net, masked_filter, mask_bias=c.mask_bias,
                                 init=c.score_init, threshold=c.threshold,
                                 mode="topk" if c.method == "topk" else "threshold", k=c.topk_k,
                                 scale=c.scale, detach_alpha=c.detach_alpha, seed=c.seed)
            if init_scores is not None:
                if isinstance(init_scores, (str, os.PathLike)):
                    init_scores = load_checkpoint(init_scores)["scores"]
                masking.load_scores_(net, init_scores)
            if c.train_bn_affine:
                for m in net.modules():
                    if isinstance(m, _BN):
                        for p in m.parameters(recurse=False):
                            p.requires_grad_(True)
        else:
            for p in net.parameters():
                p.requires_grad_(True)
        feat = self.backbone.feature_dim
        if c.objective == "supervised":
            self.objective: nn.Module = SupervisedObjective(feat, self.data.num_classes)
        else:
            self.objective = SwAVObjective(
                feat, dim=c.swav_dim, hidden=c.swav_hidden, prototypes=c.swav_prototypes,
                temperature=c.swav_temperature, epsilon=c.swav_epsilon, sinkhorn_iters=c.swav_sinkhorn_iters,
                n_global=c.swav_crops[0], queue_length=c.swav_queue_length // self.dist.world_size,
                **self._sinkhorn_reduce())
        self.model = TaskModel(net, self.objective.task_head())
        if self.dist.enabled and c.sync_bn:  # same Parameter and buffer objects, new BN modules
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.objective = nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
        self.model.to(self.device)
        self.objective.to(self.device)
        if self.cuda and c.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _build_data(self) -> None:
        c, bb, d = self.config, self.backbone, self.data
        base = list(range(len(d.train))) if c.train_indices is None else list(c.train_indices)
        if base and (min(base) < 0 or max(base) >= len(d.train)):
            raise DataError(f"train_indices out of range for {d.name} ({len(d.train)} training images)")
        labels = d.train_labels()[base]
        self.labelled = [base[i] for i in label_subset(labels, c.labels, c.seed)]
        train_idx = self.labelled if c.objective == "supervised" else base
        if c.objective == "supervised":
            tf = supervised_transform(c.image_size, bb.mean, bb.std, flip=d.flip, native_size=d.native_size)
        else:
            tf = MultiCrop(c.image_size, bb.mean, bb.std, n_global=c.swav_crops[0], n_local=c.swav_crops[1],
                           global_scale=c.swav_global_scale, local_scale=c.swav_local_scale,
                           local_size=c.swav_local_size, flip=d.flip, jitter=c.swav_jitter,
                           blur=c.swav_blur)
        self.train_set = Augmented(d.train, tf, train_idx)
        if len(self.train_set) < 2:
            raise DataError(f"only {len(self.train_set)} training image(s) after the label fraction "
                            f"{c.labels}: use more labels")
        workers = c.num_workers
        if workers is None:
            workers = min(8, os.cpu_count() or 1) if self.cuda else 0
        self.workers = workers
        w = self.dist.world_size  # under DDP each rank takes a strided shard of every permutation
        self.sampler = EpochSampler(len(self.train_set), seed=c.seed, rank=self.dist.rank, world_size=w)
        drop_last = len(self.train_set) >= c.batch_size
        if w > 1 and not drop_last:
            raise DataError(f"{len(self.train_set)} training images are fewer than the global batch "
                            f"{c.batch_size}: lower --batch-size or train on one process")
        self.loader = make_loader(self.train_set, batch_size=self.per_device_batch, sampler=self.sampler,
                                  num_workers=workers, pin_memory=self.cuda, drop_last=drop_last)
        # every rank must take the same number of steps: whole global batches only
        steps = len(self.loader) if w == 1 else len(self.train_set) // c.batch_size
        if len(self.train_set) % c.batch_size == 1 and not drop_last:
            raise DataError("a batch of one image cannot train BatchNorm: change --batch-size")
        self.steps_per_epoch = min(steps, c.max_steps_per_epoch or steps)
        self.total_steps = self.steps_per_epoch * c.epochs
        self.warmup_steps = int(round(c.warmup * self.steps_per_epoch))
        self.head_only_steps = int(round(c.head_only_epochs * self.steps_per_epoch))
        if isinstance(self.objective, SwAVObjective):
            fz = c.swav_freeze_prototypes_iters
            self.objective.freeze_iters = min(313, self.total_steps // 10) if fz is None else fz
        ev = eval_transform(c.image_size, bb.mean, bb.std)
        ekw = dict(batch_size=max(c.batch_size, 128), num_workers=workers, pin_memory=self.cuda)
        self.eval_train = self._eval_loader(Augmented(d.train, ev, self.labelled), ekw)
        self.eval_test = self._eval_loader(Augmented(d.test, ev), ekw)
        # BN re-estimation sees clean images of the training set in a seeded random order: the
        # first batches of the stored order would be a few classes only (ImageFolder is sorted by
        # class), which skews every statistic. Same order on every rank and every evaluation.
        bn_set = Augmented(d.train, ev, train_idx)
        self.bn_loader = make_loader(bn_set, batch_size=c.batch_size,
                                     sampler=EpochSampler(len(bn_set), seed=c.seed, shuffle=True),
                                     num_workers=workers, pin_memory=self.cuda)

    def _sinkhorn_reduce(self) -> dict[str, Any]:
        # DDP: Sinkhorn's sums run over the global batch (all-reduce), as in the SwAV reference
        if not self.dist.enabled:
            return {}
        return {"reduce_sum": distributed.all_reduce_sum, "world_size": self.dist.world_size}

    def _eval_loader(self, dataset: Augmented, kw: dict[str, Any]):
        # DDP: each rank extracts a strided shard; evaluate() gathers them back in order
        if self.dist.enabled:
            kw = dict(kw, sampler=EpochSampler(len(dataset), shuffle=False, rank=self.dist.rank,
                                               world_size=self.dist.world_size))
        return make_loader(dataset, **kw)

    def _wrap_ddp(self) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step = _LossStep(self.model.backbone, self.objective)
        if isinstance(self.objective, SwAVObjective):  # the queue is per rank: never broadcast it
            DDP._set_params_and_buffers_to_ignore_for_model(
                step, ["objective.queue", "objective.queue_filled"])
        # Without SyncBatchNorm, DDP broadcasts rank 0's buffers (BN running statistics) before
        # every forward: all ranks train with rank 0's running statistics (docs/distributed.md).
        import inspect

        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"  # renamed in newer PyTorch, same meaning
        return DDP(step, device_ids=[self.device.index] if self.cuda else None,
                   **{sync: not self.config.sync_bn})

    def _named_trainables(self) -> list[tuple[str, nn.Parameter]]:
        seen, out = set(), []
        for prefix, mod in (("model.", self.model), ("objective.", self.objective)):
            for n, p in mod.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append((prefix + n, p))
        return out

    def _build_optimizer(self) -> None:
        c = self.config
        scores = {id(p) for p in masking.score_parameters(self.model.backbone)}
        head = {id(p) for p in self.objective.parameters()}
        groups: dict[str, dict[str, Any]] = {
            "scores": {"params": [], "lr": c.lr, "weight_decay": 0.0},  # never decay scores
            # fft: all weights at lr; masks: only BN affine (train_bn_affine) at bn_lr, never at
            # the score lr (50 would blow BN up)
            "weights": {"params": [], "lr": c.lr if not self.masked else
                        (c.bn_lr if c.bn_lr is not None else c.head_lr), "weight_decay": c.weight_decay},
            "head": {"params": [], "lr": c.head_lr, "weight_decay": c.head_weight_decay},
        }
        if c.method == "fft":
            groups["head"]["weight_decay"] = c.weight_decay
        self.param_names: dict[int, str] = {}
        for name, p in self._named_trainables():
            self.param_names[id(p)] = name
            key = "scores" if id(p) in scores else "head" if id(p) in head else "weights"
            groups[key]["params"].append(p)
        self.groups = []
        for key, g in groups.items():
            if g["params"]:
                g["name"], g["base_lr"] = key, g["lr"]
                self.groups.append(g)
        self.optimizer = torch.optim.SGD(self.groups, lr=c.lr, momentum=c.momentum)
        self.score_params = [p for p in groups["scores"]["params"]]
        # the head-only phase holds everything but the head: scores, BN weight/bias, fft weights
        self.backbone_params = self.score_params + list(groups["weights"]["params"])

    # -- checkpoints ---------------------------------------------------------------------------

    def extras(self) -> dict[str, torch.Tensor]:
        """Trained non-mask tensors in TaskModel naming: head, trained weights, and the BN buffers
        that differ from the backbone's (with ``--bn-mode head / masked / frozen`` most keep the
        backbone's statistics; a loader takes what a task omits from the backbone)."""
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
        bn_buffers = set()
        for mname, m in self.model.named_modules():
            if isinstance(m, _BN):
                bn_buffers |= {f"{mname}.{b}" for b, t in m._buffers.items() if t is not None}
        pristine = self.backbone.model.state_dict()
        out = {}
        for name, t in self.model.state_dict().items():
            if ".parametrizations." in name:
                continue
            if name in bn_buffers and name not in trained:
                orig = pristine.get(name.removeprefix("backbone."))
                if orig is not None and torch.equal(orig, t.detach().cpu()):
                    continue
            if name.startswith("head.") or name in bn_buffers or name in trained:
                out[name] = t.detach().cpu().contiguous().clone()
        return out

    def metadata(self) -> dict[str, str]:
        c = self.config
        return {
            "mask.scale": "true" if c.scale else "false",
            "mask.mode": "topk" if c.method == "topk" else "threshold",
            "backbone": c.backbone, "backbone.hash": self.backbone.hash(),
            "method": c.method, "objective": c.objective, "dataset": c.dataset,
            "image_size": str(c.image_size), "num_classes": str(self.data.num_classes),
            "classes": json.dumps(self.data.classes), "epochs": str(self.epoch), "recipe": c.recipe,
            "mean": json.dumps(list(self.backbone.mean)), "std": json.dumps(list(self.backbone.std)),
        }

    def checkpoint(self) -> dict[str, Any]:
        c = self.config
        momentum = {}
        for g in self.optimizer.param_groups:
            for p in g["params"]:
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    momentum[self.param_names[id(p)]] = buf.detach().cpu().clone()
        return {
            "format": "maskpack-checkpoint", "version": CHECKPOINT_VERSION,
            "backbone": c.backbone, "backbone_hash": self.backbone.hash(),
            "scores": masking.extract_scores(self.model.backbone) if self.masked else {},
            "mask_mode": "topk" if c.method == "topk" else "threshold",
            "threshold": float(c.threshold), "k": float(c.topk_k), "scale": bool(c.scale),
            "extras": self.extras(), "metadata": self.metadata(),
            "objective": self._objective_state(),
            "momentum": momentum, "epoch": self.epoch, "step": self.step,
            "rng_torch": torch.get_rng_state(), "config": json.dumps(c.to_dict()),
            "history": json.dumps(self.history),
        }

    def _objective_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().clone() for k, v in self.objective.state_dict().items()}
        if self.dist.enabled and isinstance(self.objective, SwAVObjective) and self.objective.queue.shape[1]:
            # collective: the per-rank queues are stored as the one-process queue (any world size resumes)
            state["queue"] = queue_to_global(distributed.all_gather_stack(self.objective.queue),
                                             self.per_device_batch)
            state["queue_filled"] = state["queue_filled"] * self.dist.world_size
        return state

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` (rank 0 only; every rank must call it under DDP)."""
        path = self.out / "checkpoint.pt"
        state = self.checkpoint()
        if self.dist.is_main:
            atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    @torch.no_grad()
    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("backbone_hash") != self.backbone.hash():
            raise FormatError(f"checkpoint was trained on a different {ckpt.get('backbone')!r} backbone "
                              "(hash mismatch): resume with the backbone it was made with")
        if self.masked:
            scores = {k: v.to(self.device) for k, v in ckpt["scores"].items()}
            masking.load_scores_(self.model.backbone, scores)
        state = self.model.state_dict()
        for name, t in ckpt["extras"].items():
            if name not in state:
                raise FormatError(f"checkpoint tensor {name!r} does not exist in this model")
            state[name].copy_(t)
        obj = dict(ckpt["objective"])
        if self.dist.enabled and isinstance(self.objective, SwAVObjective) and obj["queue"].shape[1]:
            w = self.dist.world_size
            obj["queue"] = queue_from_global(obj["queue"], self.per_device_batch, self.dist.rank, w)
            obj["queue_filled"] = obj["queue_filled"] // w
        self.objective.load_state_dict(obj)
        by_name = {n: p for n, p in self._named_trainables()}
        for name, buf in ckpt["momentum"].items():
            if name not in by_name:
                raise FormatError(f"checkpoint optimizer state names unknown tensor {name!r}")
            p = by_name[name]
            self.optimizer.state[p]["momentum_buffer"] = buf.to(p.device).clone()
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = json.loads(ckpt["history"])
        torch.set_rng_state(ckpt["rng_torch"])

    # -- training ------------------------------------------------------------------------------

    def _emit(self, event: str, **info) -> None:
        for cb in self.callbacks:
            cb(event, {"run": self, **info})

    def _adapt_bns(self) -> list[nn.Module]:
        """``--bn-mode head / masked``: the BN layers that adapt (looked up by name: SyncBatchNorm
        conversion replaces the modules)."""
        return [self.model.backbone.get_submodule(n) for n in self.adapt_bn_names]

    def _set_train_mode(self) -> None:
        self.model.train()
        self.objective.train()
        if self.config.bn_mode != "train":
            for m in self.model.modules():
                if isinstance(m, _BN):
                    m.eval()
            for m in self._adapt_bns():
                m.train()

    def _to_device(self, batch):
        x, y = batch
        cl = torch.channels_last if (self.cuda and self.config.channels_last) else torch.contiguous_format
        if isinstance(x, list):
            x = [t.to(self.device, non_blocking=True).contiguous(memory_format=cl) for t in x]
        else:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=cl)
        return x, torch.as_tensor(y).to(self.device, non_blocking=True)

    def train_epoch(self, progress) -> dict[str, Any]:
        c = self.config
        self.sampler.set_epoch(self.epoch)
        if isinstance(self.objective, SwAVObjective):
            self.objective.use_queue = self.epoch >= int(c.swav_queue_start * c.epochs)
        self._set_train_mode()
        loss_sum, n_img, stats_sum, t0 = 0.0, 0, {}, time.perf_counter()
        task = progress.add_task(f"epoch {self.epoch + 1}/{c.epochs}", total=self.steps_per_epoch) \
            if progress else None
        for i, batch in enumerate(self.loader):
            if i >= self.steps_per_epoch:
                break
            factor = lr_factor(self.step, self.total_steps, self.warmup_steps, c.schedule)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
            batch = self._to_device(batch)
            with autocast(self.device, c.amp):
                if self.ddp is not None:  # DDP averages the score and head gradients over ranks
                    loss, stats = self.ddp(batch, self.step)
                else:
                    loss, stats = self.objective.loss(self.model.backbone, batch, self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.objective.after_backward(self.step)
            if c.score_grad_norm:  # per-tensor normalised score updates (recipe study, issue 5)
                for p in self.score_params:
                    if p.grad is not None:
                        p.grad.div_(p.grad.abs().mean().clamp_min(1e-12))
            if self.step < self.head_only_steps:
                for p in self.backbone_params:
                    p.grad = None
            self.optimizer.step()
            bs = batch[1].shape[0]
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise ConfigError(f"loss became {lv} at step {self.step}: lower --lr or --head-lr")
            loss_sum += lv * bs
            n_img += bs
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v * bs
            self.step += 1
            self._emit("step_end", step=self.step, loss=lv)
            if task is not None:
                ips = n_img / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, advance=1, description=(
                    f"epoch {self.epoch + 1}/{c.epochs} loss {loss_sum / n_img:.4f} "
                    f"lr {self.groups[0]['lr']:.4g} {ips:.0f} img/s"))
        if self.dist.enabled:  # epoch metrics over the global batch
            keys = sorted(stats_sum)
            tot = distributed.all_reduce_sum(torch.tensor([loss_sum, n_img, *[stats_sum[k] for k in keys]],
                                                          dtype=torch.float64)).tolist()
            loss_sum, n_img, stats_sum = tot[0], int(tot[1]), dict(zip(keys, tot[2:], strict=True))
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if task is not None:
            progress.remove_task(task)
        self.epoch += 1
        row = {"epoch": self.epoch, "step": self.step, "loss": loss_sum / max(n_img, 1),
               "lr": self.groups[0]["lr"], "images_per_s": n_img / max(elapsed, 1e-9),
               "epoch_seconds": elapsed}
        row.update({k: v / max(n_img, 1) for k, v in stats_sum.items()})
        row["active"] = masking.active_fraction(self.model.backbone) if self.masked else 1.0
        return row

    @torch.no_grad()
    def evaluate(self, *, final: bool) -> dict[str, Any]:
        """Test metrics. BN statistics are re-estimated first when configured; unless ``final``
        the training statistics are put back afterwards so evaluation never changes training."""
        c = self.config
        saved = None
        if c.bn_reestimate:
            if not final:
                saved = bn_state(self.model)
            reestimate_bn_(self.model, self.bn_loader, device=self.device,
                           max_batches=c.bn_reestimate_batches, amp=c.amp,
                           only=self._adapt_bns() if c.bn_mode in ("head", "masked") else None)
        out: dict[str, Any] = {}
        has_head = c.objective == "supervised"
        want_knn = c.eval_knn == "epoch" or (final and c.eval_knn == "end")
        want_probe = final and c.probe
        if has_head:
            _, y, logits = self._features(self.eval_test, with_logits=True)
            out["accuracy"] = head_accuracy(logits, y)
        if want_knn or want_probe:
            f_tr, y_tr = self._features(self.eval_train)
            f_te, y_te = self._features(self.eval_test)
            res = {}
            if self.dist.is_main:  # DDP: rank 0 fits k-NN / probe on the gathered features
                res = evaluate_features(f_tr, y_tr, f_te, y_te, knn=want_knn, probe=want_probe,
                                        k=c.knn_k, temperature=c.knn_temperature, seed=c.seed,
                                        num_classes=self.data.num_classes)
            if self.dist.enabled:
                keys = [f"{m}@{1.0:g}" for m, on in (("knn", want_knn), ("probe", want_probe)) if on]
                res = distributed.broadcast_floats(res, keys)
            out.update({k.split("@")[0]: v for k, v in res.items()})
        if saved is not None:
            load_bn_state_(self.model, saved)
        return out

    def _features(self, loader, with_logits: bool = False):
        """``extract_features`` of this rank's shard, gathered into dataset order under DDP."""
        res = extract_features(self.model, loader, device=self.device, amp=self.config.amp,
                               with_logits=with_logits)
        if not self.dist.enabled:
            return res
        n = len(loader.dataset)
        return tuple(distributed.gather_strided(t, n) for t in res)


class _LossStep(nn.Module):
    """``objective.loss(backbone, batch, step)`` as one module's forward, for DDP to wrap."""

    def __init__(self, backbone: nn.Module, objective: nn.Module):
        super().__init__()
        self.backbone, self.objective = backbone, objective

    def forward(self, batch, step: int):
        return self.objective.loss(self.backbone, batch, step)


def _check_resume(config: TrainConfig, ckpt: dict[str, Any]) -> None:
    saved = json.loads(ckpt["config"])
    new = config.to_dict()
    for key in _RESUME_FIXED:
        if new.get(key) is None:  # left open: taken from the run (see _Run)
            continue
        if new.get(key) != saved.get(key):
            raise ConfigError(f"--resume with a different {key} ({new.get(key)!r}) than the run was "
                              f"started with ({saved.get(key)!r}): leave it out or start a new --out")


def resume_config(out: str | os.PathLike, **overrides) -> TrainConfig:
    """The config a run directory was started with, with ``overrides`` (e.g. ``epochs``) applied
    and ``resume=True``; for continuing a run without repeating its options."""
    ckpt = load_checkpoint(Path(out) / "checkpoint.pt")
    d = json.loads(ckpt["config"])
    d.update(overrides)
    d.update(out=str(out), resume=True)
    return TrainConfig.from_dict(d)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``checkpoint.pt`` safely (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}: nothing to resume (start the run without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted or not a torch file
        raise FormatError(f"{path} is not a readable maskpack checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "maskpack-checkpoint":
        raise FormatError(f"{path} is not a maskpack checkpoint")
    return ckpt


def _progress(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=True)


def _fmt(row: dict[str, Any]) -> str:
    keys = ("loss", "lr", "active", "train_acc", "accuracy", "knn", "probe", "images_per_s")
    parts = [f"epoch {row['epoch']}"]
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k} {v:.4g}" if k != "images_per_s" else f"{v:.0f} img/s")
    return "  ".join(parts)


def run(config: TrainConfig, callbacks: Sequence[Callback] = (), *,
        init_scores: dict[str, torch.Tensor] | str | os.PathLike | None = None) -> TrainResult:
    """Train a mask (or fine-tune) as ``config`` says; write the run directory when ``config.out``.

    Args:
        config: the run's settings; ``None`` knobs come from ``config.recipe``.
        callbacks: ``cb(event, info)`` for events ``train_start``, ``step_end`` (``step``,
            ``loss``), ``epoch_end`` (``metrics``), ``train_end`` (``metrics``); ``info["run"]``
            is the live run state. An exception in a callback stops training (the last epoch's
            checkpoint stays valid).
        init_scores: start the scores from these (``{name: tensor}``, or a ``checkpoint.pt``
            path), e.g. cascade experts from a dispatcher. Ignored on resume.

    Returns:
        A :class:`TrainResult`.
    """
    r = _Run(config, callbacks, None if config.resume else init_scores)
    c = r.config
    main = r.dist.is_main  # under DDP only rank 0 prints and writes
    progress = _progress(c.quiet or not main)
    metrics_path = r.out / "metrics.jsonl" if r.out else None
    if main and metrics_path is not None and not config.resume and metrics_path.exists():
        metrics_path.unlink()
    r._emit("train_start")
    stop = c.epochs if c.stop_after is None else min(c.epochs, r.epoch + c.stop_after)
    if progress:
        progress.start()
    try:
        while r.epoch < stop:
            row = r.train_epoch(progress)
            final = r.epoch == c.epochs
            if final or (c.eval_every and r.epoch % c.eval_every == 0):
                row.update(r.evaluate(final=final))
            r.history.append(row)
            if r.out is not None:
                r.save_checkpoint()  # after eval: the final checkpoint holds re-estimated BN stats
                if main:
                    _append_jsonl(metrics_path, row)
            if progress:
                progress.console.print(_fmt(row))
            r._emit("epoch_end", metrics=row)
    finally:
        if progress:
            progress.stop()
    return _finish(r)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    # One line per epoch: the checkpoint is written first, so after a kill the metrics file
    # never claims an epoch the checkpoint lacks. A rewrite keeps it consistent on resume.
    lines = path.read_text().splitlines() if path.exists() else []
    lines = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) < row["epoch"]]
    lines.append(json.dumps(row))
    _write_text(path, "\n".join(lines) + "\n")


def _finish(r: _Run) -> TrainResult:
    c = r.config
    r.model.eval()
    masks = masking.extract_masks(r.model.backbone) if r.masked else {}
    scores = masking.extract_scores(r.model.backbone) if r.masked else {}
    extras = r.extras()
    metrics = dict(r.history[-1]) if r.history else {}
    if r.masked:
        metrics["active"] = masking.active_fraction(masks)
    task_path = None
    if r.out is not None and c.save_task and r.epoch >= c.epochs:
        task_path = _save_task(r, masks, extras) if r.dist.is_main else r.out / (
            "task.mask" if r.masked else "model.safetensors")
    distributed.barrier()  # DDP: the task file exists before any rank goes on
    r.model.to("cpu")
    r._emit("train_end", metrics=metrics)
    return TrainResult(c, r.model, r.objective.cpu(), masks, scores, extras, metrics, r.history, r.out,
                       (r.out / "checkpoint.pt") if r.out else None, task_path)


def _save_task(r: _Run, masks, extras) -> Path:
    meta = r.metadata()
    if r.masked:
        from .io import save

        path = r.out / "task.mask"
        save(path, masks, r.backbone, extras=extras, metadata=meta, codec=r.config.codec)  # atomic
        return path
    from safetensors.torch import save_file

    path = r.out / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in r.model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return path
