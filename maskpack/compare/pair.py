"""The two training runs of ``maskpack bench``: a mask and a full fine-tune with the same budget."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The last row of ``metrics.jsonl`` next to a task file (``{}`` when there is none)."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "metrics.jsonl"
    if not f.exists():
        return {}
    rows = [ln for ln in f.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(rows[-1]) if rows else {}
    except ValueError:
        return {}


@dataclass
class PairConfig:
    """The two training runs of ``maskpack bench``: a mask and a full fine-tune, same budget.

    Both use the trainer's default recipe for their method (masks: normalised score lr 0.003 on
    the last 25 tensors, bfloat16 extras, int8 head; fft: lr 0.01, weight decay 5e-4), the same
    data, epochs, image size, batch size and seed.
    """

    dataset: str = "digits"
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    epochs: int = 6
    image_size: int | None = 32
    batch_size: int = 64
    data_dir: str | None = None
    download: bool | None = None
    out: str = "runs/bench"
    device: str = "auto"
    seed: int = 0
    max_steps_per_epoch: int | None = None
    quiet: bool = True
    lora_rank: int | None = None  # also train a LoRA of this rank (compare/lora.py; needs peft)


_REUSE_KEYS = ("backbone", "dataset", "epochs", "image_size", "batch_size", "seed", "method")


def _check_reuse(run_dir: Path, config: PairConfig, method: str) -> None:
    """A finished run is reused only when it was trained with the settings asked for now."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # no record (a hand-made run directory): trust the caller
    want = {"backbone": config.backbone, "dataset": config.dataset, "epochs": config.epochs,
            "image_size": config.image_size, "batch_size": config.batch_size, "seed": config.seed,
            "method": method}
    for key in _REUSE_KEYS:
        if key in saved and saved[key] != want[key] and not (key == "image_size" and want[key] is None):
            raise ConfigError(f"{run_dir} was trained with {key}={saved[key]!r}, not {want[key]!r}: choose "
                              "another --out, or remove that directory to retrain")


def train_pair(config: PairConfig, *, callbacks=()) -> dict[str, Any]:
    """Train the mask and the fine-tune into ``out/mask`` and ``out/fft``.

    A side whose run directory already holds its finished task file is reused, not retrained.
    With ``config.lora_rank`` a LoRA is trained into ``out/lora`` too
    (:func:`maskpack.compare.lora.train_lora`).

    Returns:
        ``{"mask_path", "fft_path", "accuracy": {"mask", "fft"}, "train_s": {"mask", "fft"}}``, and
        ``"lora"`` (the LoRA run's record) plus ``lora`` entries in both dicts with a LoRA.
    """
    from ..train import TrainConfig, run

    out: dict[str, Any] = {"accuracy": {}, "train_s": {}}
    for method, fname in (("mask", "task.mask"), ("fft", "model.safetensors")):
        run_dir = Path(config.out) / method
        task = run_dir / fname
        if task.exists():
            _check_reuse(run_dir, config, method)
            out[f"{method}_path"] = str(task)
            out["accuracy"][method] = read_metrics(task).get("accuracy")
            out["train_s"][method] = 0.0
            continue
        if (run_dir / "checkpoint.pt").exists():
            raise ConfigError(f"{run_dir} holds an unfinished run: finish it with `maskpack train --resume "
                              f"--out {run_dir}` or choose another --out")
        tc = TrainConfig(backbone=config.backbone, backbone_weights=config.backbone_weights,
                         dataset=config.dataset, data_dir=config.data_dir,
                         download=config.download, method=method, epochs=config.epochs,
                         batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
                         device=config.device, max_steps_per_epoch=config.max_steps_per_epoch,
                         out=str(run_dir), quiet=config.quiet, eval_knn="never", eval_every=0)
        t0 = time.perf_counter()
        result = run(tc, callbacks)
        out["train_s"][method] = time.perf_counter() - t0
        out[f"{method}_path"] = str(result.task_path)
        out["accuracy"][method] = result.metrics.get("accuracy")
    if config.lora_rank:
        from .lora import train_lora

        out["lora"] = train_lora(config, config.lora_rank)
        out["accuracy"]["lora"] = out["lora"]["accuracy"]
        out["train_s"]["lora"] = 0.0 if out["lora"]["reused"] else out["lora"]["train_s"]
    return out
