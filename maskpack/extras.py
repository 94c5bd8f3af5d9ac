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

import re
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ConfigError, FormatError

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


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Values rounded to nearest (ties to even) with ``bits`` explicit mantissa bits, as float32.

    The exponent is kept, so the relative error is at most ``2^-(bits+1)``; with ``bits`` <= 10
    (7) the result is exact in float16 (bfloat16) wherever that dtype holds the value as a normal
    number, and the low mantissa bits of the stored values are zero, which the extras' byte planes
    compress to almost nothing.

    Args:
        t: a floating tensor (computed on as float32).
        bits: 0 to 23; 23 returns the float32 values unchanged.

    Returns:
        A new float32 tensor.

    Raises:
        ConfigError: ``bits`` out of range, or a value that rounds to infinity.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 23:
        raise ConfigError(f"mantissa bits must be an integer in 0..23, got {bits!r}")
    x = t.detach().to(torch.float32).contiguous()
    if bits == 23:
        return x.clone()
    drop = 23 - bits
    u = x.view(torch.int32)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & ~((1 << drop) - 1)
    out = u.view(torch.float32)
    if bool(torch.isfinite(x).all()) and not bool(torch.isfinite(out).all()):
        raise ConfigError(f"a value of {float(x.abs().max()):.4g} overflows when rounded to {bits} "
                          "mantissa bits")
    return out


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


# --- compact head: per-class symmetric integer quantisation of ``head.weight`` -----------------
#
# Stored form (``stored_extras``): ``head.weight`` as int8 (8 bits, q in [-127, 127]) or as uint8
# holding two 4-bit values a byte (4 bits: byte j of a row holds column 2j in its low nibble and
# column 2j + 1 in its high nibble, each as q + 8, so q in [-7, 7] is stored as 1..15; an odd
# width pads each row's last high nibble with 8, i.e. q = 0), ``head.weight_scale`` (one scale a
# class, in the extras dtype) and the metadata ``head.bits`` / ``head.in_features``. The value is
# ``q * scale`` in float32. Each row's scale is max|w_r| / (2^(bits-1) - 1) rounded toward zero to
# the extras dtype (float32 scales keep 17 significant bits), so every product q * scale is exact
# in float32: a loader computes the trained values bit for bit, and quantising those values again
# gives the same q and scale (the trainer quantises once to evaluate and again to write the file).

HEAD_BITS = (8, 4)
HEAD_SCALE = "head.weight_scale"
_PAD = 8  # the stored nibble of q = 0 (the 4-bit offset)


def check_head_bits(value: object) -> int | None:
    """The head quantisation a ``head_bits`` value asks for.

    Args:
        value: ``None`` or ``0`` (off: the head follows ``extras_dtype``), ``8`` or ``4``.

    Returns:
        ``None`` (off), 8 or 4.

    Raises:
        ConfigError: any other value.
    """
    if value is None or (value == 0 and not isinstance(value, bool)):
        return None
    if isinstance(value, bool) or value not in HEAD_BITS:
        raise ConfigError(f"head_bits {value!r}: use 8 or 4 (per-class int8 / int4 head), or 0 / null "
                          "for a head in extras_dtype")
    return int(value)


def _smallest(dt: torch.dtype) -> torch.Tensor:
    """The smallest positive scale of the extras dtype (its least subnormal; float32: 17 bits kept)."""
    if dt == torch.float32:
        return torch.tensor([0x80], dtype=torch.int32).view(torch.float32)
    return torch.tensor([1], dtype=torch.int16).view(dt).float()


def _round_down(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Non-negative float32 ``x`` rounded toward zero to values of ``dtype`` (float32: to 17
    significant bits), returned as float32."""
    dt = extras_dtype(dtype)
    if dt == torch.float32:
        return (x.contiguous().view(torch.int32) & ~0x7F).view(torch.float32)
    big = float(torch.finfo(dt).max)
    if bool((x > big).any()):
        raise ConfigError(f"head.weight scale {float(x.max()):.4g} does not fit {dtype}: use extras_dtype "
                          "bfloat16 or float32")
    r = x.to(dt)
    below = (r.view(torch.int16) - 1).view(dt)  # the next value toward zero (r > 0 wherever it is used)
    return torch.where(r.float() > x, below, r).float()


@torch.no_grad()
def quantize_head(weight: torch.Tensor, bits: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class symmetric quantisation of a linear head's weight (module comment above).

    Args:
        weight: ``(classes, features)`` floating tensor.
        bits: 8 or 4.
        dtype: the ``extras_dtype`` the scales are stored in.

    Returns:
        ``q`` (int8, ``(classes, features)``, in [-(2^(bits-1) - 1), 2^(bits-1) - 1]) and ``scale``
        (float32, ``(classes,)``, values of ``dtype``); the head's value is :func:`dequantize_head`.

    Raises:
        ConfigError: not a 2-D floating weight with features, non-finite values, bad ``bits``.
    """
    bits = check_head_bits(bits)
    if bits is None or weight.ndim != 2 or weight.shape[1] == 0 or not weight.is_floating_point():
        raise ConfigError(f"head_bits needs a 2-D float head.weight and bits 8 or 4, got "
                          f"{tuple(weight.shape)} {weight.dtype}, bits {bits}")
    w = weight.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("head.weight has non-finite values: it cannot be quantised")
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    scale = _round_down(amax / qmax, dtype)
    scale = torch.where(scale == 0, _smallest(extras_dtype(dtype)), scale)
    q = torch.round(w / scale[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    # a row that quantises to zeros (all zero, or below the smallest scale): scale 1
    scale = torch.where(q.abs().amax(dim=1) == 0, torch.ones_like(scale), scale)
    return q, scale


def dequantize_head(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` per row, in float32 (exact: see the module comment).

    Args:
        q: ``(classes, features)`` integer values.
        scale: ``(classes,)`` scales.

    Returns:
        The float32 ``(classes, features)`` weight.
    """
    return q.to(torch.float32) * scale.to(torch.float32)[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-7, 7] two a byte: low nibble column 2j, high nibble 2j + 1, each q + 8;
    an odd width is padded with q = 0.

    Args:
        q: ``(classes, features)`` int8.

    Returns:
        ``(classes, ceil(features / 2))`` uint8.
    """
    u = (q.to(torch.int16) + _PAD).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full((u.shape[0], 1), _PAD, dtype=torch.uint8)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4` (no checks: see :func:`decode_head`).

    Args:
        packed: ``(classes, ceil(in_features / 2))`` uint8.
        in_features: the head's input width.

    Returns:
        ``(classes, in_features)`` int8.
    """
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    return (nibbles.to(torch.int16) - _PAD).to(torch.int8)[:, :in_features]


def stored_extras(extras: dict[str, torch.Tensor], dtype: str,
                  head_bits: int | None) -> dict[str, torch.Tensor]:
    """The extras as a task file stores them: :func:`cast_extras`, with ``head.weight`` quantised
    per class when ``head_bits`` is 8 or 4 (module comment; metadata from :func:`head_metadata`).

    Args:
        extras: ``{name: tensor}`` in TaskModel naming.
        dtype: an ``extras_dtype`` name.
        head_bits: None (head in ``dtype``), 8 or 4.

    Returns:
        A new dict (tensors on the CPU).

    Raises:
        ConfigError: ``head_bits`` is set and there is no 2-D ``head.weight``.
    """
    bits = check_head_bits(head_bits)
    if bits is None:
        return cast_extras(extras, dtype)
    if "head.weight" not in extras:
        raise ConfigError("head_bits quantises 'head.weight', but the task has no head")
    out = cast_extras({k: v for k, v in extras.items() if k != "head.weight"}, dtype)
    q, scale = quantize_head(extras["head.weight"], bits, dtype)
    out["head.weight"] = q if bits == 8 else pack_int4(q)
    out[HEAD_SCALE] = scale.to(extras_dtype(dtype))
    return out


def head_metadata(weight: torch.Tensor, head_bits: int | None) -> dict[str, str]:
    """The metadata a quantised head needs (``head.bits``, ``head.in_features``); ``{}`` when off.

    Args:
        weight: the float ``(classes, features)`` head weight.
        head_bits: None, 8 or 4.

    Returns:
        String metadata.
    """
    bits = check_head_bits(head_bits)
    return {} if bits is None else {"head.bits": str(bits), "head.in_features": str(weight.shape[1])}


def head_bits_of(metadata: dict[str, str], where: str) -> int | None:
    """The ``head_bits`` a task's metadata records (``head.bits``).

    Args:
        metadata: the task's metadata. where: the file, for messages.

    Returns:
        None (no quantised head), 8 or 4.

    Raises:
        FormatError: ``head.bits`` is neither ``8`` nor ``4``.
    """
    raw = metadata.get("head.bits")
    if raw is None:
        return None
    if raw not in ("8", "4"):
        raise FormatError(f"{where}: metadata 'head.bits' is {raw!r}, expected '8' or '4'")
    return int(raw)


def _head_shape(w: torch.Tensor, scale: torch.Tensor | None, metadata: dict[str, str],
                where: str) -> tuple[int, int]:
    """Check a quantised head's tensors and metadata; return ``(bits, in_features)``."""
    bits = {torch.int8: 8, torch.uint8: 4}.get(w.dtype)
    if bits is None:
        raise FormatError(f"{where}: extra 'head.weight' has dtype {w.dtype}: a head is stored as a float, "
                          "int8 (head_bits 8) or uint8 (head_bits 4) tensor")
    if scale is None:
        raise FormatError(f"{where}: extra 'head.weight' is stored as {w.dtype} (a {bits}-bit head) but "
                          f"{HEAD_SCALE!r} is missing, so it cannot be dequantised: the file is damaged; "
                          "write the task again")
    if w.ndim != 2 or not scale.is_floating_point() or tuple(scale.shape) != (w.shape[0],):
        raise FormatError(f"{where}: extra {HEAD_SCALE!r} is {scale.dtype} {tuple(scale.shape)}, but a "
                          f"{tuple(w.shape)} {w.dtype} 'head.weight' needs one float scale a class "
                          f"({w.shape[0] if w.ndim == 2 else '?'},): the file is damaged")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise FormatError(f"{where}: extra {HEAD_SCALE!r} holds a zero, negative or non-finite scale: "
                          "the file is damaged")
    if metadata.get("head.bits") != str(bits):
        raise FormatError(f"{where}: extra 'head.weight' is {w.dtype} (a {bits}-bit head) but metadata "
                          f"'head.bits' is {metadata.get('head.bits')!r}: the file is damaged")
    raw = metadata.get("head.in_features", "")
    cols = int(raw) if re.fullmatch(r"[0-9]{1,9}", raw) else 0
    if cols < 1 or w.shape[1] != (cols if bits == 8 else (cols + 1) // 2):
        raise FormatError(f"{where}: metadata 'head.in_features' {raw!r} does not fit the {bits}-bit "
                          f"'head.weight' of shape {tuple(w.shape)}: the file is damaged")
    return bits, cols


def decode_head(extras: dict[str, torch.Tensor], metadata: dict[str, str],
                where: str) -> dict[str, torch.Tensor]:
    """The extras as a model takes them: a quantised ``head.weight`` (:func:`stored_extras`)
    dequantised to float32, ``head.weight_scale`` dropped; other extras unchanged.

    Args:
        extras: the stored extras.
        metadata: the task file's metadata (``head.bits``, ``head.in_features``).
        where: the file, for messages.

    Returns:
        A new dict when the head was quantised, else ``extras`` itself.

    Raises:
        FormatError: a quantised head without a valid ``head.weight_scale`` or metadata, with values
        outside the symmetric range or non-zero padding; a scale or ``head.bits`` beside a float head.
    """
    w = extras.get("head.weight")
    if w is None or w.is_floating_point():
        if HEAD_SCALE in extras or "head.bits" in metadata:
            raise FormatError(f"{where}: {HEAD_SCALE!r} or metadata 'head.bits' without an integer "
                              f"'head.weight' ({'missing' if w is None else w.dtype}): the file is damaged")
        return extras
    scale = extras.get(HEAD_SCALE)
    bits, cols = _head_shape(w, scale, metadata, where)
    if bits == 8:
        q, bad = w, bool((w == -128).any())
    else:
        q = unpack_int4(w, cols)
        bad = bool(((w & 0x0F) == 0).any() or ((w >> 4) == 0).any())
        if cols % 2:
            bad = bad or bool(((w[:, -1] >> 4) != _PAD).any())
    if bad:
        raise FormatError(f"{where}: extra 'head.weight' holds values outside the symmetric {bits}-bit range "
                          "or non-zero padding: the file is damaged")
    weight = dequantize_head(q, scale)
    if not bool(torch.isfinite(weight).all()):
        raise FormatError(f"{where}: extra {HEAD_SCALE!r} overflows float32 times 'head.weight': the file "
                          "is damaged")
    out = {k: v for k, v in extras.items() if k != HEAD_SCALE}
    out["head.weight"] = weight
    return out
