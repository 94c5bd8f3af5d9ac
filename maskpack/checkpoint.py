"""The one resume-checkpoint schema: build, save, load (``weights_only``), masks from scores.

A ``checkpoint.pt`` is a ``torch.save`` of a plain dict (tensors, strings, numbers, dicts of
tensors) so ``torch.load(..., weights_only=True)`` reads it without pickle:

* ``format`` ``"maskpack-checkpoint"``, ``version`` (:data:`CHECKPOINT_VERSION`);
* ``backbone`` (registry name), ``backbone_hash`` (sha256 of the weights trained on);
* ``scores`` ``{name: float tensor}`` (empty for fft), ``mask_mode`` (threshold | topk),
  ``threshold``, ``k``, ``scale``: everything needed to turn scores into masks;
* ``extras`` (TaskModel-named tensors the task stores), ``metadata`` (the task's string notes);
* ``objective`` (head / SwAV state), ``momentum`` (SGD buffers by trainable name), ``epoch``,
  ``step``, ``rng_torch``, ``config`` (JSON of the TrainConfig), ``history`` (JSON list).
"""

from __future__ import annotations

import io as _bytes_io
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, FormatError
from .io import write_atomic
from .masking import masks_from_scores

FORMAT = "maskpack-checkpoint"
CHECKPOINT_VERSION = 1
# key -> accepted types; every checkpoint has these
_SCHEMA: dict[str, tuple[type, ...]] = {
    "format": (str,), "version": (int,), "backbone": (str,), "backbone_hash": (str,), "scores": (dict,),
    "mask_mode": (str,), "threshold": (float, int), "k": (float, int), "scale": (bool,), "extras": (dict,),
    "metadata": (dict,), "objective": (dict,), "momentum": (dict,), "epoch": (int,), "step": (int,),
    "rng_torch": (torch.Tensor,), "config": (str,), "history": (str,),
}


def build_checkpoint(**fields: Any) -> dict[str, Any]:
    """A checkpoint dict from its fields (every key of the schema but ``format`` / ``version``).

    Raises:
        ConfigError: a field is missing or unknown (a programming error, caught early).
    """
    ckpt = {"format": FORMAT, "version": CHECKPOINT_VERSION, **fields}
    missing, unknown = sorted(set(_SCHEMA) - set(ckpt)), sorted(set(ckpt) - set(_SCHEMA))
    if missing or unknown:
        raise ConfigError(f"checkpoint fields: missing {missing}, unknown {unknown}")
    return ckpt


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` to ``path`` atomically (``torch.save`` format)."""
    buf = _bytes_io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a ``checkpoint.pt`` (``weights_only=True``: no pickle).

    Raises:
        ConfigError: there is no file (nothing to resume). FormatError: not a readable maskpack
        checkpoint, or one with missing or mistyped fields.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}: nothing to resume (start the run without --resume)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise FormatError(f"{path} is not a readable training checkpoint "
                          f"({type(exc).__name__}: {first})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FormatError(f"{path} is not a maskpack training checkpoint (no format {FORMAT!r})")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > CHECKPOINT_VERSION:
        raise FormatError(f"{path}: checkpoint version {ckpt.get('version')!r} is newer than this maskpack "
                          f"reads ({CHECKPOINT_VERSION}): upgrade maskpack")
    for key, types in _SCHEMA.items():
        if not isinstance(ckpt.get(key), types):
            raise FormatError(f"{path}: checkpoint field {key!r} is missing or not "
                              f"{' or '.join(t.__name__ for t in types)}")
    bad = [k for k, v in ckpt["scores"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(f"{path}: checkpoint score {bad[0]!r} is not a tensor")
    return ckpt


def masks_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The masks a checkpoint's scores give (its mask mode, threshold and top-k fraction)."""
    return masks_from_scores(ckpt["scores"], mode=ckpt["mask_mode"], threshold=float(ckpt["threshold"]),
                             k=float(ckpt["k"]))
