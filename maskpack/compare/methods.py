"""Lossless methods for fp32 weights: general codecs, byte grouping (ZipNN), XOR with the backbone.

* ``bytegroup+zstd-19``: split the fp32 stream into its 4 byte planes and compress each with
  zstd -19 (the exponent bytes are very compressible, the mantissa bytes are not);
* ``xor+zstd-19`` and ``xor+bytegroup+zstd-19``: XOR the fine-tuned bits with the backbone's bits
  first (the decoder has the backbone, as it has for the masks), so unchanged sign, exponent and
  high mantissa bits become zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ConfigError, FormatError
from ..storage.codecs import get_codec

# (row name, registry codec, level): the general codecs used on both sides.
GENERAL: tuple[tuple[str, str, int | None], ...] = (
    ("gzip-9", "gzip", 9), ("bz2-9", "bz2", 9), ("lzma-9", "lzma", 9), ("lz4", "lz4", None),
    ("snappy", "snappy", None), ("zstd-3", "zstd", 3), ("zstd-19", "zstd", 19),
)
# The fp32 methods run by default. ``xor+zstd-19`` (XOR delta, no byte grouping) is available but
# left out: it is the slowest method and never the best (byte grouping after the XOR always wins).
FP32_DEFAULT = ("raw", *(n for n, _, _ in GENERAL), "bytegroup+zstd-19", "xor+bytegroup+zstd-19")


def byte_group(data: bytes) -> list[bytes]:
    """Split a little-endian 4-byte-word stream into its 4 byte planes (plane 3: sign + exponent)."""
    if len(data) % 4:
        raise ConfigError(f"byte grouping needs a multiple of 4 bytes, got {len(data)}")
    words = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4)
    return [words[:, i].tobytes() for i in range(4)]


def byte_ungroup(planes: list[bytes]) -> bytes:
    """Inverse of :func:`byte_group`."""
    n = len(planes[0])
    if len(planes) != 4 or any(len(p) != n for p in planes):
        raise FormatError("byte planes must be 4 planes of equal length")
    out = np.empty((n, 4), dtype=np.uint8)
    for i, p in enumerate(planes):
        out[:, i] = np.frombuffer(p, dtype=np.uint8)
    return out.tobytes()


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """Bitwise XOR of two equally long byte strings (self-inverse: ``xor(xor(a, b), b) == a``)."""
    if len(a) != len(b):
        raise ConfigError(f"XOR needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) % 8 == 0:
        return (np.frombuffer(a, dtype=np.uint64) ^ np.frombuffer(b, dtype=np.uint64)).tobytes()
    return (np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8)).tobytes()


def _general_encode(codec: str, level: int | None, data: bytes) -> bytes:
    return get_codec(codec).compress(data, level)


def _general_decode(codec: str, payload: bytes, size: int) -> bytes:
    return get_codec(codec).decompress(payload, size)


def _grouped_encode(data: bytes) -> bytes:
    # Frame: 4 little-endian uint32 plane lengths, then the 4 zstd frames.
    parts = [_general_encode("zstd", 19, p) for p in byte_group(data)]
    return struct.pack("<4I", *(len(p) for p in parts)) + b"".join(parts)


def _grouped_decode(payload: bytes, size: int) -> bytes:
    if len(payload) < 16:
        raise FormatError("byte-grouped payload is shorter than its 16-byte frame header")
    lengths = struct.unpack_from("<4I", payload)
    if 16 + sum(lengths) != len(payload):
        raise FormatError("byte-grouped payload's plane lengths do not add up to its size")
    planes, pos = [], 16
    for n in lengths:
        planes.append(_general_decode("zstd", payload[pos:pos + n], size // 4))
        pos += n
    return byte_ungroup(planes)


def fp32_methods() -> dict[str, tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes, int], bytes]]]:
    """``{name: (encode(data, base), decode(payload, base, size))}`` for every fp32 method.

    ``base`` is the backbone's bytes of the same tensors (only the ``xor+`` methods use it).
    """
    out: dict[str, Any] = {"raw": (lambda d, b: d, lambda p, b, n: p)}
    for name, codec, level in GENERAL:
        out[name] = (lambda d, b, c=codec, lv=level: _general_encode(c, lv, d),
                     lambda p, b, n, c=codec: _general_decode(c, p, n))
    out["bytegroup+zstd-19"] = (lambda d, b: _grouped_encode(d), lambda p, b, n: _grouped_decode(p, n))
    out["xor+zstd-19"] = (lambda d, b: _general_encode("zstd", 19, xor_bytes(d, b)),
                          lambda p, b, n: xor_bytes(_general_decode("zstd", p, n), b))
    out["xor+bytegroup+zstd-19"] = (lambda d, b: _grouped_encode(xor_bytes(d, b)),
                                    lambda p, b, n: xor_bytes(_grouped_decode(p, n), b))
    return out
