"""Backbone identity: a content hash over the frozen weights.

A mask only makes sense on the exact weights it was learned on. ``backbone_hash`` hashes,
in sorted name order, each state-dict entry's name, dtype, shape and raw little-endian bytes,
so it is stable across processes and machines and independent of dict order, and any changed
weight, dtype or name changes it.
"""

from __future__ import annotations

import hashlib
import struct
import sys

import torch
from torch import nn

_DOMAIN = b"maskpack-backbone-v1\0"


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        flat = t.reshape(-1, 1).view(torch.uint8).flip(-1).reshape(-1)
    return memoryview(flat.numpy())


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 hex digest over the sorted (name, dtype, shape, bytes) of ``state``."""
    h = hashlib.sha256(_DOMAIN)
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode()
        h.update(struct.pack("<I", len(header)))
        h.update(header)
        data = _tensor_bytes(t)
        h.update(struct.pack("<Q", data.nbytes))
        h.update(data)
    return h.hexdigest()


def backbone_hash(model) -> str:
    """Content hash of a frozen backbone.

    Args:
        model: a :class:`maskpack.backbones.Backbone` or any ``nn.Module`` (its state dict is hashed).

    Returns:
        64 hex characters (sha256).

    Example:
        >>> from maskpack import load_backbone, backbone_hash
        >>> backbone_hash(load_backbone("efficientnet_lite0"))[:12]  # doctest: +SKIP
    """
    module = getattr(model, "model", model)
    if not isinstance(module, nn.Module):
        raise TypeError(f"backbone_hash expects a Backbone or nn.Module, got {type(model).__name__}")
    return state_dict_hash(module.state_dict())
