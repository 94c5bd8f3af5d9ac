"""A task's extras (head, BN weight/bias and statistics) in their stored precision, and BN folding.

A run defines its task in the precision it stores: at the end of training the extras are rounded
to ``extras_dtype`` and written back into the model, so the model evaluated at the end is the one
a loader rebuilds from the file, bit for bit (loaders cast stored extras to the model's dtype,
which is exact from bfloat16 / float16 to float32).

Folding (``bn_fold``) rewrites an eval-mode BatchNorm layer as a per-channel affine map: weight
``w / sqrt(var + eps)``, bias ``b - mean * w / sqrt(var + eps)``, running mean 0 and running
variance ``1 - eps``. The layer computes nearly the same function (to float rounding), but two of
its four stored vectors become constants, which the extras' zstd stores in a few bytes. A folded
layer is an eval-time layer: training it further in train mode would normalise with batch
statistics and then apply the folded scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import ConfigError

EXTRAS_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def extras_dtype(name: str) -> torch.dtype:
    """The torch dtype of an ``extras_dtype`` name.

    Args:
        name: ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The dtype.

    Raises:
        ConfigError: an unknown name.
    """
    if name not in EXTRAS_DTYPES:
        raise ConfigError(f"extras_dtype {name!r}: use one of {', '.join(EXTRAS_DTYPES)}")
    return EXTRAS_DTYPES[name]


def cast_extras(extras: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The extras as stored: floating tensors in ``dtype``, integer ones (BN's
    ``num_batches_tracked``) unchanged.

    Args:
        extras: ``{name: tensor}`` in TaskModel naming.
        dtype: an ``extras_dtype`` name.

    Returns:
        A new dict (tensors on the CPU).
    """
    dt = extras_dtype(dtype)
    return {k: v.detach().cpu().to(dt) if v.is_floating_point() else v.detach().cpu()
            for k, v in extras.items()}


@torch.no_grad()
def round_tensors_(tensors: Iterable[tuple[str, torch.Tensor]], dtype: str) -> None:
    """Round floating tensors in place to the values ``dtype`` can hold (they keep their own dtype).

    Args:
        tensors: ``(name, tensor)`` pairs, e.g. from a state dict (which shares storage with the model).
        dtype: an ``extras_dtype`` name.

    Raises:
        ConfigError: a value does not fit ``dtype`` (float16 overflows above 65504).
    """
    dt = extras_dtype(dtype)
    for name, t in tensors:
        if not t.is_floating_point() or t.dtype == dt:
            continue
        r = t.to(dt)
        if not bool(torch.isfinite(r).all()) and bool(torch.isfinite(t).all()):
            raise ConfigError(f"extra tensor {name!r} does not fit {dtype} (max |value| "
                              f"{float(t.abs().max()):.4g}): use extras_dtype bfloat16 or float32")
        t.copy_(r.to(t.dtype))


@torch.no_grad()
def fold_bn_(bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm layer's statistics into its weight and bias (module docstring).

    Args:
        bn: a BatchNorm layer with affine weight/bias and running statistics.

    Raises:
        ConfigError: the layer has no affine parameters or no running statistics.
    """
    if bn.weight is None or bn.running_var is None:
        raise ConfigError(f"cannot fold {bn}: it needs affine weight/bias and running statistics "
                          "(use --set bn_fold=false)")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    bn.weight.copy_(scale)
    bn.bias.copy_(shift)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
