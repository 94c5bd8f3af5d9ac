"""Evaluation: head accuracy, k-NN and linear probes on frozen features, label fractions.

* k-NN: k=200, temperature 0.1, cosine similarity of L2-normalised features, votes weighted by
  ``exp(sim / T)`` (the protocol of InstDisc / SwAV / DINO).
* Linear probe: scikit-learn logistic regression on standardised frozen features.
* Label fractions: a class-stratified, seeded subset of the training labels (``0.01,0.1,1.0``).

Example:
    >>> feats, labels = extract_features(model, loader)                # doctest: +SKIP
    >>> knn_accuracy(feats, labels, test_feats, test_labels)           # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import Augmented, DataBundle, eval_transform, label_subset, load_dataset, make_loader
from .errors import ConfigError, FormatError
from .model import TaskModel

_BN = nn.modules.batchnorm._BatchNorm


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU stays fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _features_of(model: nn.Module):
    return model.features if isinstance(model, TaskModel) else model


@torch.no_grad()
def extract_features(model: nn.Module, loader, *, device: str | torch.device = "cpu",
                     amp: bool = True, with_logits: bool = False):
    """Features (N, F) float32 on the CPU and labels (N,) int64 of every batch in ``loader``.

    Args:
        model: a :class:`TaskModel` (its ``features``) or any module mapping images to features.
        loader: yields ``(images, labels)``.
        device: where to run the model (it is moved there and put in eval mode).
        amp: bf16 autocast on CUDA.
        with_logits: also return the head's outputs (TaskModel only) as a third value.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    feats_fn = _features_of(model)
    feats, labels, logits = [], [], []
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            f = feats_fn(images)
            if with_logits:
                logits.append(model.head(f).float().cpu())
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    out_f = torch.cat(feats) if feats else torch.zeros(0, 0)
    out_y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if with_logits:
        return out_f, out_y, (torch.cat(logits) if logits else torch.zeros(0, 0))
    return out_f, out_y


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int = 200, temperature: float = 0.1,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted k-NN accuracy with cosine similarity.

    Args:
        train_feats, train_labels: the memory bank (N, F) and its labels (N,).
        test_feats, test_labels: queries (M, F) and their labels (M,).
        k: neighbours (clamped to the bank size).
        temperature: votes are ``exp(cos / temperature)``.
        num_classes: defaults to ``max label + 1``.
    """
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise ConfigError("k-NN needs at least one training and one test sample")
    bank = torch.nn.functional.normalize(train_feats.float(), dim=1)
    queries = torch.nn.functional.normalize(test_feats.float(), dim=1)
    c = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for i in range(0, len(queries), chunk):
        sim = queries[i:i + chunk] @ bank.t()  # (m, N)
        top, idx = sim.topk(k, dim=1)
        weights = (top / temperature).exp()  # (m, k)
        votes = torch.zeros(len(sim), c).scatter_add_(1, train_labels[idx], weights)
        correct += int((votes.argmax(1) == test_labels[i:i + chunk]).sum())
    return correct / len(queries)


def linear_probe(train_feats, train_labels, test_feats, test_labels, *, C: float = 1.0,
                 max_iter: int = 1000, seed: int = 0) -> float:
    """Test accuracy of a logistic regression trained on frozen, standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_tr, y_tr = np.asarray(train_feats, dtype=np.float64), np.asarray(train_labels)
    x_te, y_te = np.asarray(test_feats, dtype=np.float64), np.asarray(test_labels)
    if len(np.unique(y_tr)) < 2:
        raise ConfigError("the linear probe needs labelled samples of at least two classes")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with np.errstate(all="ignore"):
        clf.fit(x_tr, y_tr)
    return float((clf.predict(x_te) == y_te).mean())


def head_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a classifier's logits."""
    return float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())


def last_bn_name(model: nn.Module) -> str | None:
    """Name of the last BatchNorm layer in module order (Lite0 / Lite2: the conv head's ``_bn1``,
    which normalises the pre-activations of the pooled features), or None without BN."""
    names = [n for n, m in model.named_modules() if isinstance(m, _BN)]
    return names[-1] if names else None


def bn_after(model: nn.Module, owners: set[str]) -> list[str]:
    """Names of the BatchNorm layers that first follow each module in ``owners`` (module order:
    a conv's own BN in EfficientNet and ResNet blocks)."""
    out, pending = [], False
    for name, m in model.named_modules():
        if name in owners:
            pending = True
        elif pending and isinstance(m, _BN):
            out.append(name)
            pending = False
    return out


@torch.no_grad()
def reestimate_bn_(model: nn.Module, loader, *, device: str | torch.device = "cpu",
                   max_batches: int = 100, amp: bool = True,
                   only: Sequence[nn.Module] | None = None) -> int:
    """Recompute BatchNorm running statistics as a cumulative average over ``loader`` (in place).

    Only the BN layers being re-estimated run in train mode (all of them, or those in ``only``);
    everything else stays in eval mode. Returns the number of batches used (0 when there is no
    BatchNorm to re-estimate).
    """
    device = torch.device(device)
    pool = list(model.modules()) if only is None else list(only)
    bns = [m for m in pool if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    feats_fn = _features_of(model)
    n = 0
    for images, _ in loader:
        if n >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        with autocast(device, amp):
            feats_fn(images)
        n += 1
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was_training)
    return n


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm buffer (to restore after a temporary re-estimation)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _BN):
            for b, t in m._buffers.items():
                if t is not None:
                    out[f"{name}.{b}"] = t.detach().clone()
    return out


@torch.no_grad()
def load_bn_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, _BN):
            for b, t in m._buffers.items():
                if t is not None and f"{name}.{b}" in state:
                    t.copy_(state[f"{name}.{b}"])


# ----------------------------------------------------------------------------- protocol


def evaluate_features(train_feats, train_labels, test_feats, test_labels, *,
                      fractions: Sequence[float] = (1.0,), knn: bool = True, probe: bool = True,
                      k: int = 200, temperature: float = 0.1, seed: int = 0,
                      num_classes: int | None = None) -> dict[str, float]:
    """k-NN and linear-probe accuracies for each label fraction: keys ``knn@0.1``, ``probe@0.1``."""
    out: dict[str, float] = {}
    for frac in fractions:
        idx = label_subset(np.asarray(train_labels), frac, seed)
        f, y = train_feats[idx], torch.as_tensor(train_labels)[idx]
        if knn:
            out[f"knn@{frac:g}"] = knn_accuracy(f, y, test_feats, test_labels, k=k,
                                                temperature=temperature, num_classes=num_classes)
        if probe:
            out[f"probe@{frac:g}"] = linear_probe(f.numpy(), y.numpy(), test_feats.numpy(),
                                                  np.asarray(test_labels), seed=seed)
    return out


def evaluate_model(model: nn.Module, data: DataBundle, *, image_size: int, mean, std,
                   fractions: Sequence[float] = (1.0,), knn: bool = True, probe: bool = True,
                   batch_size: int = 256, device: str | torch.device = "cpu", num_workers: int = 0,
                   seed: int = 0, k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """Head accuracy (when the model has a classifier), k-NN and probe for each label fraction."""
    tf = eval_transform(image_size, mean, std)
    pin = torch.device(device).type == "cuda"
    lkw = dict(batch_size=batch_size, num_workers=num_workers, pin_memory=pin)
    tr = make_loader(Augmented(data.train, tf), **lkw)
    te = make_loader(Augmented(data.test, tf), **lkw)
    has_head = isinstance(model, TaskModel) and not isinstance(model.head, nn.Identity)
    f_tr, y_tr = extract_features(model, tr, device=device)
    if has_head:
        f_te, y_te, logits = extract_features(model, te, device=device, with_logits=True)
    else:
        f_te, y_te = extract_features(model, te, device=device)
    out = {}
    if has_head:
        out["accuracy"] = head_accuracy(logits, y_te)
    out.update(evaluate_features(f_tr, y_tr, f_te, y_te, fractions=fractions, knn=knn, probe=probe,
                                 k=k, temperature=temperature, seed=seed, num_classes=data.num_classes))
    return out


def load_task_model(path: str | os.PathLike, backbone) -> tuple[TaskModel, dict[str, str]]:
    """Load a trained task: a ``.mask`` file, an fft ``model.safetensors``, or a run directory.

    Returns:
        The :class:`TaskModel` (eval mode) and the task's metadata (may be empty).
    """
    path = Path(path)
    if path.is_dir():
        for name in ("task.mask", "model.safetensors"):
            if (path / name).exists():
                return load_task_model(path / name, backbone)
        raise FormatError(f"run directory {path} holds no task.mask or model.safetensors yet "
                          "(is training finished? `maskpack train --resume --out DIR` finishes it)")
    if not path.exists():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix == ".safetensors":
        return _load_fft(path, backbone)
    from .io import load, read

    return load(path, backbone), dict(read(path).metadata)


def _load_fft(path: Path, backbone) -> tuple[TaskModel, dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .rehydrate import build_head

    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    model = TaskModel(backbone.copy_model(), build_head(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"{path} does not match backbone {backbone.name!r}: {exc}") from exc
    return model.eval(), meta


def evaluate(task: str | os.PathLike | None, *, backbone: str | None = None, dataset: str | None = None,
             image_size: int | None = None, fractions: Sequence[float] = (1.0,), knn: bool = True,
             probe: bool = True, baseline: bool = True, data_dir: str | None = None,
             download: bool | None = None, device: str = "auto", batch_size: int = 256, seed: int = 0,
             num_workers: int = 0) -> dict[str, dict[str, float]]:
    """Evaluate a trained task (and the plain backbone) on a dataset.

    Args:
        task: a ``.mask`` / ``model.safetensors`` / run directory, or None for the backbone only.
        backbone, dataset, image_size: default to what the task was trained with (its metadata),
            then to ``efficientnet_lite0`` / ``digits`` / the dataset's own size.
        fractions: label fractions for k-NN and the probe.
        baseline: also evaluate the plain pretrained backbone.

    Returns:
        ``{"backbone": {...}, "task": {...}}`` with keys ``accuracy``, ``knn@F``, ``probe@F``.
    """
    from .backbones import DEFAULT_BACKBONE, load_backbone

    meta: dict[str, str] = {}
    if task is not None:
        meta = _task_metadata(Path(task))
    bb = load_backbone(backbone or meta.get("backbone", DEFAULT_BACKBONE))
    dataset = dataset or meta.get("dataset", "digits")
    size = image_size or (int(meta["image_size"]) if meta.get("image_size") else None)
    data = load_dataset(dataset, image_size=size, data_dir=data_dir, download=download)
    size = size or min(data.native_size, bb.input_size)
    dev = resolve_device(device)
    kw = dict(image_size=size, mean=bb.mean, std=bb.std, fractions=fractions, knn=knn, probe=probe,
              batch_size=batch_size, device=dev, seed=seed, num_workers=num_workers)
    out: dict[str, dict[str, float]] = {}
    if baseline or task is None:
        out["backbone"] = evaluate_model(TaskModel(bb.copy_model()), data, **kw)
    if task is not None:
        model, _ = load_task_model(task, bb)
        out["task"] = evaluate_model(model, data, **kw)
    return out


def _task_metadata(path: Path) -> dict[str, str]:
    """Training settings recorded in a task's metadata or next to it (run dir config.json)."""
    if path.suffix == ".mask" and path.is_file():
        from .io import read

        meta = read(path).metadata
        return {k: meta[k] for k in ("backbone", "dataset", "image_size") if meta.get(k)}
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if cfg.exists():
        with contextlib.suppress(ValueError, OSError):
            c = json.loads(cfg.read_text())
            return {k: str(c[k]) for k in ("backbone", "dataset", "image_size") if c.get(k) is not None}
    return {}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(device)
