"""Mask codecs behind one registry.

Every codec maps one flat bool array (plus, for ``ans``, the backbone weight magnitudes at the same
positions) to bytes and back. The general-purpose codecs compress the bit-packed mask
(:mod:`maskpack.storage.bits`); their decoders never produce more than the expected number of
bytes, whatever the payload claims (no decompression bombs).

Example:
    >>> import numpy as np
    >>> codec = get_codec("zstd")
    >>> bits = np.array([True, False, True])
    >>> codec.decode(codec.encode(bits), 3).tolist()
    [True, False, True]
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import CodecError
from . import bits

Absw = np.ndarray | None  # |W| of the backbone tensor, flat float32, or None


@dataclass(frozen=True)
class Codec:
    """A named mask codec.

    Attributes:
        name: registry name, stored in ``.mask`` headers.
        needs_backbone: True when decoding needs the backbone's weights (``ans``).
        default_level: compression level used when none is given (None: no levels).
        levels: the accepted level range (inclusive), or None.
        max_ratio: the most packed bytes one payload byte can decode to (a property of the
            compressed format, whatever the encoder), or None where the format has no useful
            bound (bz2, lzma, ans).
    """

    name: str
    _encode: Callable[[bytes, int | None], bytes] | None = None
    _decode: Callable[[bytes, int], bytes] | None = None
    needs_backbone: bool = False
    default_level: int | None = None
    levels: tuple[int, int] | None = None
    max_ratio: int | None = None

    def max_elements(self, length: int) -> int | None:
        """The most mask elements a ``length``-byte payload can decode to (None: no bound).

        Args:
            length: payload bytes.

        Returns:
            ``8 * (max_ratio * length + 64)``, or None for codecs without a bound.
        """
        return None if self.max_ratio is None else 8 * (self.max_ratio * length + RATIO_SLACK)

    def check_level(self, level: int | None) -> int | None:
        """The level to use; raises CodecError when ``level`` is out of range for this codec."""
        if level is None:
            return self.default_level
        if self.levels is None:
            raise CodecError(f"codec {self.name!r} has no compression levels; leave level unset")
        lo, hi = self.levels
        if not lo <= int(level) <= hi:
            raise CodecError(f"codec {self.name!r} takes levels {lo}..{hi}, got {level}")
        return int(level)

    def compress(self, data: bytes, level: int | None = None) -> bytes:
        """Compress raw bytes with this general-purpose codec (every codec but ``ans``).

        Args:
            data: any bytes.
            level: compression level (None: the codec's default).

        Returns:
            The compressed payload; :meth:`decompress` restores ``data``.
        """
        if self.needs_backbone:
            raise CodecError(f"codec {self.name!r} codes masks only; compress bytes with a general codec")
        level = self.check_level(level)
        return data if self._encode is None else self._encode(data, level)

    def decompress(self, payload: bytes, size: int) -> bytes:
        """Inverse of :meth:`compress`; ``size`` is the original length (an output cap)."""
        if self.needs_backbone:
            raise CodecError(f"codec {self.name!r} codes masks only; decompress bytes with a general codec")
        if self._decode is None:
            return bytes(payload)
        if size == 0 and self.name == "lz4":  # lz4's frame of empty input decodes without a cap
            return b""
        return self._decode(bytes(payload), size)

    def encode(self, mask: np.ndarray, absw: Absw = None, level: int | None = None) -> bytes:
        """Compress a flat bool array (``absw``: flat |W|, only used by ``ans``)."""
        level = self.check_level(level)
        if self.name == "ans":
            from .entropy import encode_mask

            return encode_mask(mask, absw)
        packed = bits.pack(mask)
        return packed if self._encode is None else self._encode(packed, level)

    def decode(self, payload: bytes | memoryview, numel: int, absw: Absw = None) -> np.ndarray:
        """Decompress to a flat bool array of ``numel`` elements; CodecError on any bad payload."""
        if self.name == "ans":
            from .entropy import decode_mask

            return decode_mask(bytes(payload), numel, absw)
        expected = bits.packed_size(numel)
        if self._decode is None:
            return bits.unpack(payload, numel)
        try:
            packed = self._decode(bytes(payload), expected)
        except CodecError:
            raise
        except Exception as exc:  # each library has its own error types; all mean a bad payload
            raise CodecError(f"{self.name} payload does not decode: {type(exc).__name__}: {exc}") from exc
        if len(packed) != expected:
            raise CodecError(f"{self.name} payload decodes to {len(packed)} bytes, expected {expected}")
        return bits.unpack(packed, numel)


def _bounded(decomp, data: bytes, cap: int) -> bytes:
    """Run a streaming decompressor producing at most ``cap + 1`` bytes; require a clean end."""
    out = decomp.decompress(data, max_length=cap + 1)
    if len(out) > cap:
        raise CodecError(f"payload decompresses to more than the expected {cap} bytes")
    if not decomp.eof:
        raise CodecError("payload is truncated (compressed stream has no end)")
    if decomp.unused_data:
        raise CodecError("payload has trailing bytes after the compressed stream")
    return out


def _gzip_dec(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(data, cap + 1)
    if len(out) > cap:
        raise CodecError(f"payload decompresses to more than the expected {cap} bytes")
    if not d.eof:
        raise CodecError("gzip payload is truncated (compressed stream has no end)")
    if d.unused_data:
        raise CodecError("gzip payload has trailing bytes after the compressed stream")
    return out


def _lz4_enc(data: bytes, level: int | None) -> bytes:
    import lz4.block

    mode = "high_compression" if level else "default"
    return lz4.block.compress(data, mode=mode, compression=level or 0, store_size=False)


def _lz4_dec(data: bytes, cap: int) -> bytes:
    import lz4.block

    if cap == 0:
        return b"" if data == b"\x00" else _fail("lz4 payload of an empty mask must be one zero byte")
    return lz4.block.decompress(data, uncompressed_size=cap)


def _fail(msg: str) -> bytes:
    raise CodecError(msg)


def _snappy_dec(data: bytes, cap: int) -> bytes:
    import snappy

    # The raw snappy format starts with the uncompressed length as a varint: check it first.
    n, shift = 0, 0
    for i, byte in enumerate(data[:5]):
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
        if i == 4:
            raise CodecError("snappy payload has a malformed length prefix")
    if n != cap:
        raise CodecError(f"snappy payload declares {n} bytes, expected {cap}")
    return snappy.uncompress(data)


def _zstd_enc(data: bytes, level: int | None) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False).compress(data)


def _zstd_dec(data: bytes, cap: int) -> bytes:
    import zstandard

    size = zstandard.frame_content_size(data)
    if size != cap:
        raise CodecError(f"zstd payload declares {size} bytes, expected {cap}")
    # The frame's declared size was checked above and zstd enforces it, so output is bounded by ``cap``.
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(data)
    if not d.eof:
        raise CodecError("zstd payload is truncated (compressed stream has no end)")
    if d.unused_data:
        raise CodecError("zstd payload has trailing bytes after the frame")
    if len(out) != cap:
        raise CodecError(f"zstd payload decodes to {len(out)} bytes, expected {cap}")
    return out


def _lzma_filters(level: int | None, size: int):
    # Raw LZMA2 (no container header); the dictionary is sized from the (validated) output size so
    # neither side allocates the preset's 64 MiB.
    return [{"id": lzma.FILTER_LZMA2, "preset": 9 if level is None else level, "dict_size": max(4096, size)}]


def _lzma_enc(data: bytes, level: int | None) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(level, len(data)))


def _lzma_dec(data: bytes, cap: int) -> bytes:
    return _bounded(lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(None, cap)), data, cap)


# Largest expansion of each format (output bytes per input byte), from the formats themselves:
# DEFLATE emits at most 258 bytes per 2-bit match (1032); an LZ4 block adds 255 bytes of match per
# extra length byte; a snappy copy turns 3 bytes into at most 64; a zstd block holds at most
# 128 KiB and takes at least 4 bytes (an RLE block). Measured on 2^27 zero bytes: 1029, 255, 21.3
# and 32,625. bz2 (run-length stages: over 10^6) and lzma (about 7,000 measured, more possible)
# have no useful bound, nor has ans (an empty bucket costs one byte however large).
RATIO_SLACK = 64
CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("raw", max_ratio=1),
        Codec("gzip", lambda d, lv: gzip.compress(d, compresslevel=lv, mtime=0), _gzip_dec,
              default_level=9, levels=(0, 9), max_ratio=1032),
        Codec("bz2", lambda d, lv: bz2.compress(d, compresslevel=lv),
              lambda d, cap: _bounded(bz2.BZ2Decompressor(), d, cap), default_level=9, levels=(1, 9)),
        Codec("lzma", _lzma_enc, _lzma_dec,
              default_level=9, levels=(0, 9)),
        Codec("lz4", _lz4_enc, _lz4_dec, default_level=None, levels=(1, 12), max_ratio=256),
        Codec("snappy", lambda d, lv: __import__("snappy").compress(d), _snappy_dec, max_ratio=22),
        Codec("zstd", _zstd_enc, _zstd_dec, default_level=19, levels=(1, 22), max_ratio=32768),
        Codec("ans", needs_backbone=True),
    )
}

DEFAULT_CODEC = "ans"
GENERAL_CODECS = ("gzip", "bz2", "lzma", "zstd")  # the strong general-purpose baselines


def get_codec(name: str) -> Codec:
    """Look a codec up by name.

    Raises:
        CodecError: for an unknown name (the message lists the known ones).
    """
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}: use one of {', '.join(CODECS)}") from None


def available_codecs() -> list[str]:
    """Names of all registered codecs."""
    return list(CODECS)
