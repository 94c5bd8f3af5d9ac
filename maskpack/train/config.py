"""Training settings: :class:`TrainConfig`, the named recipes, and :func:`resolve_config`.

A recipe is a named table of defaults for the knobs left at ``None``; :func:`resolve_config`
checks the options and fills those knobs, so a study can change defaults without touching the
loop. Fields marked ``resume: fixed`` in their metadata must match when a run is resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..bn import BN_MODES
from ..errors import ConfigError, DataError
from ..extras import EXTRAS_DTYPES, check_head_bits

METHODS = ("mask", "topk", "fft")
# train_bn_affine on every BN layer, or only on the BN right after each masked layer
BN_AFFINE_SCOPES = ("all", "masked")
OBJECTIVES = ("supervised", "swav")

# What every recipe shares unless it says otherwise.
_COMMON: dict[str, Any] = {
    "head_lr": {"mask": 0.01, "topk": 0.01, "fft": None},  # None: same as lr
    "weight_decay": {"mask": 0.0, "topk": 0.0, "fft": 5e-4},
    "warmup": 1.0,
    "bn_reestimate": True,
    "bn_mode": {"mask": "train", "topk": "train", "fft": "train"},
    "mask_layers": {"mask": "all", "topk": "all", "fft": "all"},
    # the task's extras: stored precision, which BN layers train weight/bias, BN folding
    "extras_dtype": "float32",
    "bn_affine_scope": "all",
    "bn_fold": False,
    "head_bits": None,  # supervised mask tasks only; None: the head in extras_dtype
}
# Per-tensor normalised score updates (docs/recipe-study.md): Lite0's score gradients span ~600x
# across layers, so one raw lr (the paper's 50) wrecks the first layers while the last ones never
# move; dividing each score tensor's gradient by its mean |g| equalises them, and training the BN
# weight/bias alongside (at the head lr, stored as extras) adds the rest.
_NORMALIZED: dict[str, Any] = {
    **_COMMON,
    "lr": {"mask": 0.002, "topk": 0.1, "fft": 0.01},
    # top-k keeps the raw scores (its lr 0.1 was not studied with normalisation)
    "score_grad_norm": {"mask": True, "topk": False, "fft": False},
    "train_bn_affine": {"mask": True, "topk": False, "fft": False},
}
# The normalised recipe on the last 25 tensors only (Lite0: blocks 8-15 and the conv head) with
# only their BN layers adapting; the early layers keep the backbone's weights and ImageNet
# statistics. The task stores its head and the adapted layers' BN statistics in bfloat16 and no
# BN weight/bias (docs/recipe-study.md "What the extras cost"): on digits at the bench budget
# training them did not help accuracy and cost 1.5x the file.
_LATE: dict[str, Any] = {
    **_NORMALIZED,
    # lr 0.003 (0.002 on every layer): on the last 25 tensors it beat 0.002 on cifar10-5k and on
    # digits at the bench budget in every seed (docs/recipe-study.md "Score lr on the last 25
    # tensors"); the masks switch more weights off (digits: 2.7% instead of 1.4%): files ~25% larger
    "lr": {"mask": 0.003, "topk": 0.1, "fft": 0.01},
    "mask_layers": {"mask": "last:25", "topk": "all", "fft": "all"},
    "bn_mode": {"mask": "masked", "topk": "train", "fft": "train"},
    "train_bn_affine": {"mask": False, "topk": False, "fft": False},
    "extras_dtype": "bfloat16",
    # a per-class int8 head: no prediction changed on digits or cifar10-5k (docs/results/compact-head.md)
    "head_bits": {"mask": 8, "topk": None, "fft": None},
}
# SwAV knobs (objective "swav"): the SwAV paper's settings, which the Self-Masking paper used.
_SWAV_PAPER: dict[str, Any] = {
    "swav_prototypes": 500, "swav_crops": (2, 6), "swav_global_scale": (0.14, 1.0),
    "swav_jitter": 0.8, "swav_blur": True, "head_only_epochs": 0.0,
}
# SwAV for small images (docs/recipe-study.md "SwAV at 32 px"): with the paper's augmentation two
# views of a 32 px image are hardly closer in Lite0's feature space than two different images, so
# the masks take the shortcut to a constant output. Milder crops and jitter, no blur, two global
# crops, a linear projection at lr 1, 100 prototypes, the scores frozen for the first quarter of
# the epochs (the head learns first), masks on the last 13 tensors (Lite0: blocks 12-15 and the
# conv head) with only their BN layers adapting.
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
    # masks on every layer, every BN adapting (SwAV: the default's)
    "normalized": {**_NORMALIZED, "swav": _SWAV_SMALL},
    # The paper's recipe (Warmerdam et al.): lr 50, S0 = 1, mu = 0, BN in train mode, a linear
    # warm-up of 40/150 of the schedule, no BN re-estimation.
    "paper": {**_COMMON, "lr": {"mask": 50.0, "topk": 0.1, "fft": 1e-3}, "warmup": "40/150",
              "bn_reestimate": False, "swav": _SWAV_PAPER},
    # The paper's raw score lr 50 with a 1-epoch warm-up and BN re-estimation.
    "lr50": {**_COMMON, "lr": {"mask": 50.0, "topk": 0.1, "fft": 0.01}, "swav": _SWAV_PAPER},
}


def _fixed(default: Any) -> Any:
    """A field that must match the run's when resuming (checked by :func:`check_resume`)."""
    return field(default=default, metadata={"resume": "fixed"})


@dataclass
class TrainConfig:
    """Every knob of a training run. ``None`` means "from the recipe" (or the dataset)."""

    # what
    backbone: str = _fixed("efficientnet_lite0")
    backbone_weights: str | None = None  # local weights file for the backbone (docs/backbones.md)
    dataset: str = _fixed("digits")
    data_dir: str | None = None
    download: bool | None = None  # None: fetch a missing CIFAR archive unless MASKPACK_OFFLINE is set
    objective: str = _fixed("supervised")  # supervised | swav
    method: str = _fixed("mask")  # mask | topk | fft
    recipe: str = "default"
    # schedule / optimiser
    epochs: int = 10
    batch_size: int = _fixed(64)
    lr: float | None = None  # score lr for masks, all weights for fft
    head_lr: float | None = None  # head / projection / prototypes
    weight_decay: float | None = None  # fft weights only: never applied to scores
    head_weight_decay: float = 0.0
    momentum: float = 0.9
    warmup: float | str | None = None  # epochs (fractional ok) or "a/b" of the epochs
    schedule: str = "cosine"  # cosine | constant
    head_only_epochs: float | str | None = None  # head first, backbone frozen: epochs or 'a/b' of them
    # data
    image_size: int | None = _fixed(None)  # default: the dataset's size, capped at the backbone's
    labels: float = _fixed(1.0)  # fraction of training labels (supervised training, k-NN/probe bank)
    train_indices: list[int] | None = _fixed(None)  # train on a subset of the train split
    # masking
    mask_layers: str | None = _fixed(None)  # layer_filter: all, no-stem, last:N, re:REGEX, ...; None: recipe
    mask_bias: bool = _fixed(False)
    score_init: float = _fixed(1.0)
    threshold: float = _fixed(0.0)
    topk_k: float = _fixed(0.9)
    scale: bool = _fixed(True)
    detach_alpha: bool = _fixed(False)
    # batch norm
    bn_mode: str | None = None  # train | frozen | head | masked (BN_MODES); None: the recipe's
    bn_reestimate: bool | None = None  # re-estimate BN stats on clean train images before eval/save
    bn_reestimate_batches: int = 100
    train_bn_affine: bool | None = None  # masks: also train BN weight/bias (saved as extras); None: recipe
    bn_lr: float | None = None  # lr of those BN weight/bias (None: head_lr; never the score lr)
    bn_affine_scope: str | None = None  # train_bn_affine on "all" BN layers or the "masked" layers' own BN
    bn_fold: bool | None = None  # masks: fold adapted BN layers into scale/shift at the end (fewer extras)
    extras_dtype: str | None = None  # masks: float32 | bfloat16 | float16; extras rounded to it at the end
    head_bits: int | None = None  # supervised masks: 8 | 4 per-class int8 / int4 head; 0: off; None: recipe
    score_grad_norm: bool | None = None  # masks: divide each score tensor's gradient by its mean |g|
    sync_bn: bool = False  # under torchrun (CUDA): SyncBatchNorm, batch statistics over the global batch
    # SwAV
    swav_dim: int = _fixed(128)
    swav_hidden: int = _fixed(0)
    swav_prototypes: int | None = _fixed(None)  # None: the recipe's (default 100, paper 500)
    swav_temperature: float = 0.1
    swav_epsilon: float = 0.05
    swav_sinkhorn_iters: int = 3
    swav_crops: tuple[int, int] | None = _fixed(None)  # (global, local); default (2, 0), paper (2, 6)
    swav_global_scale: tuple[float, float] | None = None  # default (0.5, 1), paper (0.14, 1)
    swav_local_scale: tuple[float, float] = (0.05, 0.14)
    swav_local_size: int | None = None
    swav_jitter: float | None = None  # colour-jitter strength (0: none, no grayscale); default 0.4, paper 0.8
    swav_blur: bool | None = None  # Gaussian blur with p=0.5; default off, paper on
    swav_queue_length: int = _fixed(1024)
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
    seed: int = _fixed(0)
    num_workers: int | None = None  # None: 0 on CPU, up to 8 on CUDA
    threads: int | None = None  # CPU threads for torch (None: torch's default)
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA
    compile: bool = False  # masks: every masked weight in one fused pass per step (masking.compile_masks_)
    max_steps_per_epoch: int | None = None  # cap (benchmarks); changes the schedule
    stop_after: int | None = None  # stop after this many epochs (budgeted runs; resume later)
    out: str | None = None
    resume: bool = False
    quiet: bool = False
    save_task: bool = True
    keep_checkpoint: bool = False  # keep checkpoint.pt after the task file is written
    codec: str = "ans"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}")
        d = dict(d)
        for k in ("swav_crops", "swav_global_scale", "swav_local_scale"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def resume_fixed_fields() -> tuple[str, ...]:
    """Names of the fields that must match when a run is resumed."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume") == "fixed")


def check_resume(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Raise ConfigError when ``config`` sets a resume-fixed field differently than ``saved``
    (the run's recorded config as a dict); fields left at None are taken from the run."""
    new = config.to_dict()
    for key in resume_fixed_fields():
        if new.get(key) is None:
            continue
        if new.get(key) != saved.get(key):
            raise ConfigError(f"--resume with a different {key} ({new.get(key)!r}) than the run was "
                              f"started with ({saved.get(key)!r}): leave it out or start a new --out")


def parse_epochs(value: float | str, epochs: int, what: str = "warm-up") -> float:
    """Epochs from ``1.5`` or ``'1.5'``, or a fraction ``'a/b'`` of ``epochs``."""
    if isinstance(value, str):
        try:
            if "/" in value:
                a, _, b = value.partition("/")
                return epochs * float(a) / float(b)
            return float(value)
        except (ValueError, ZeroDivisionError) as exc:
            raise ConfigError(f"{what} {value!r}: use epochs (1.5) or a fraction 'a/b'") from exc
    return float(value)


def _check_options(c: TrainConfig) -> None:
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
    if not 0.0 < c.labels <= 1.0:
        raise DataError(f"label fraction must be in (0, 1], got {c.labels}")
    if c.method == "topk" and not 0.0 < c.topk_k <= 1.0:
        raise ConfigError(f"topk fraction must be in (0, 1], got {c.topk_k}")


def recipe_table(recipe: str, objective: str) -> dict[str, Any]:
    """The recipe's defaults for ``objective``: the recipe's own, with the SwAV knobs (the paper's
    SwAV values, which supervised runs store but never use) and, for SwAV runs, the recipe's SwAV
    overrides merged in (per-method dicts override only the methods they name)."""
    rec = {k: v for k, v in RECIPES[recipe].items() if k != "swav"}
    swav = RECIPES[recipe].get("swav", {}) if objective == "swav" else {}
    for key, v in {**_SWAV_PAPER, **swav}.items():
        rec[key] = {**rec.get(key, {}), **v} if isinstance(v, dict) else v
    return rec


def _per_method(value: Any, method: str) -> Any:
    return value[method] if isinstance(value, dict) else value


def _fill_swav(c: TrainConfig, rec: dict[str, Any]) -> None:
    for key in _SWAV_PAPER:
        if getattr(c, key) is None:
            setattr(c, key, rec[key])
    c.head_only_epochs = parse_epochs(c.head_only_epochs, c.epochs, "head_only_epochs")
    if c.head_only_epochs < 0:
        raise ConfigError(f"head_only_epochs must be >= 0, got {c.head_only_epochs}")
    if c.swav_crops[0] < 2 and c.objective == "swav":
        raise ConfigError("SwAV needs at least 2 global crops")
    if not 0.0 <= c.swav_jitter <= 1.0:
        raise ConfigError(f"swav_jitter (colour-jitter strength) must be in [0, 1], got {c.swav_jitter}")


def _fill_extras(c: TrainConfig, rec: dict[str, Any]) -> None:
    for key in ("extras_dtype", "bn_affine_scope"):
        if getattr(c, key) is None:
            setattr(c, key, _per_method(rec[key], c.method))
    if c.extras_dtype not in EXTRAS_DTYPES:
        raise ConfigError(f"unknown extras_dtype {c.extras_dtype!r}: use one of {', '.join(EXTRAS_DTYPES)}")
    if c.head_bits is None:  # the recipe's, for the tasks that store a supervised head
        c.head_bits = (None if c.objective != "supervised" else _per_method(rec["head_bits"], c.method))
    c.head_bits = check_head_bits(c.head_bits)
    if c.head_bits and (c.method == "fft" or c.objective != "supervised"):
        raise ConfigError(f"head_bits {c.head_bits} quantises the head of a supervised mask task (method "
                          f"mask or topk), not method {c.method!r} objective {c.objective!r}: leave "
                          "head_bits unset")
    if c.bn_affine_scope not in BN_AFFINE_SCOPES:
        raise ConfigError(f"unknown bn_affine_scope {c.bn_affine_scope!r}: use one of "
                          f"{', '.join(BN_AFFINE_SCOPES)}")


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Check options and fill ``None`` knobs from the recipe (a new config; the input is kept).

    The image size is left to the trainer (it depends on the dataset and the backbone).

    Raises:
        ConfigError: an unknown recipe, method, objective, mode or an out-of-range value.
    """
    c = dataclasses.replace(config)
    _check_options(c)
    rec = recipe_table(c.recipe, c.objective)
    _fill_swav(c, rec)
    for key in ("lr", "head_lr", "weight_decay"):
        if getattr(c, key) is None:
            setattr(c, key, rec[key][c.method])
    if c.head_lr is None:
        c.head_lr = c.lr
    c.warmup = parse_epochs(rec["warmup"] if c.warmup is None else c.warmup, c.epochs)
    if c.warmup < 0:
        raise ConfigError(f"warm-up must be >= 0 epochs, got {c.warmup}")
    if c.bn_reestimate is None:
        c.bn_reestimate = rec["bn_reestimate"]
    for key in ("bn_mode", "mask_layers"):
        if getattr(c, key) is None:
            setattr(c, key, _per_method(rec[key], c.method))
    if c.bn_mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {c.bn_mode!r}: use one of {', '.join(BN_MODES)}")
    for key in ("score_grad_norm", "train_bn_affine", "bn_fold"):
        if getattr(c, key) is None:
            setattr(c, key, bool(_per_method(rec.get(key, False), c.method)))
    _fill_extras(c, rec)
    if c.lr is None or c.lr <= 0:
        raise ConfigError(f"learning rate must be > 0, got {c.lr}")
    return c


def recipe_defaults(key: str, recipe: str = "default") -> str:
    """What ``recipe`` sets ``key`` to for each objective and method, as text for help and docs,
    e.g. ``supervised: mask 0.002, topk 0.1, fft 0.01; swav: mask 0.02, ...``."""
    parts = []
    for objective in OBJECTIVES:
        vals = []
        for m in METHODS:
            c = resolve_config(TrainConfig(recipe=recipe, method=m, objective=objective))
            vals.append(f"{m} {getattr(c, key)}")
        parts.append(f"{objective}: {', '.join(vals)}")
    return "; ".join(parts)


def recipe_default(key: str, objective: str, method: str, recipe: str = "default") -> Any:
    """The value ``recipe`` gives ``key`` for one objective and method (after resolution)."""
    return getattr(resolve_config(TrainConfig(recipe=recipe, method=method, objective=objective)), key)
