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
from .errors import ConfigError
from .model import TaskModel
from .runtime import autocast, resolve_device


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
        from .io import load_task

        model, _ = load_task(task, bb)
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
