"""Where tensors run: device choice, autocast, channels-last batches, CPU threads."""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The :class:`torch.device`.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU stays fp32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch, device: torch.device, channels_last: bool = False):
    """Move ``(images, labels)`` to ``device``; ``images`` may be a list of crops.

    Args:
        batch: ``(x, y)`` with ``x`` a tensor or a list of tensors.
        device: the target device.
        channels_last: store images channels-last (fast convolutions on CUDA).
    """
    x, y = batch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(x, list):
        x = [t.to(device, non_blocking=True).contiguous(memory_format=fmt) for t in x]
    else:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
    return x, torch.as_tensor(y).to(device, non_blocking=True)
