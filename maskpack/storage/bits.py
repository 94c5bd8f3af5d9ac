"""Bool arrays <-> packed bytes.

Bits are packed in C order with ``np.packbits(..., bitorder="little")``: element ``i`` of the
flattened mask is bit ``i % 8`` (least significant first) of byte ``i // 8``; the unused high
bits of the last byte are zero (and must be zero when unpacking).
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError


def packed_size(numel: int) -> int:
    """Bytes needed for ``numel`` bits."""
    return (numel + 7) // 8


def pack(mask: np.ndarray) -> bytes:
    """Pack a bool array (any shape, C order) into bytes, little bit order."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    return np.packbits(flat, bitorder="little").tobytes()


def unpack(data: bytes | memoryview, numel: int) -> np.ndarray:
    """Unpack ``numel`` bits from ``data`` into a flat bool array.

    Raises:
        CodecError: when ``data`` is not exactly ``packed_size(numel)`` bytes or padding bits are set.
    """
    if len(data) != packed_size(numel):
        raise CodecError(f"packed mask has {len(data)} bytes, expected {packed_size(numel)} for {numel} bits")
    raw = np.frombuffer(data, dtype=np.uint8)
    if numel % 8 and raw[-1] >> (numel % 8):
        raise CodecError("packed mask has non-zero padding bits")
    return np.unpackbits(raw, count=numel, bitorder="little").view(bool)
