"""Inflate and parse a ``.mask`` header under limits that hold before and while parsing.

A hostile header must not cost more than a small multiple of its file's size. So:

* the inflated size is capped at ``HEADER_RATIO * compressed + HEADER_SLACK`` bytes and at
  :data:`MAX_HEADER_JSON` (inflation stops at the cap: nothing bigger is ever allocated);
* the JSON parser counts while it parses: at most :data:`MAX_OBJECTS` objects, at most
  :data:`MAX_OBJECT_KEYS` keys in one object, keys of at most :data:`MAX_KEY_CHARS` characters,
  no duplicated key, integers of at most :data:`MAX_INT_DIGITS` digits, no fractions, exponents,
  ``NaN`` or ``Infinity`` (a header holds none);

so the Python objects a header turns into stay within a few tens of bytes per header byte.
The per-field limits (tensor count, names, metadata) are checked by
:mod:`maskpack.storage.container` right after parsing.
"""

from __future__ import annotations

import gc
import json
import zlib

from ..errors import FormatError

MAX_TENSORS = 16384  # tensor entries in one file
MAX_METADATA_BYTES = 1 << 20  # UTF-8 bytes of all metadata keys and values together
MAX_HEADER_JSON = 4 << 20  # inflated header bytes, whatever the compressed size
HEADER_RATIO = 64  # ... and at most this many times the compressed header
# ... plus this many bytes: metadata at its limit inflates however well it compresses; tensor
# entries (distinct offsets and crc32s) compress well under 64x (27x for 784 near-identical ones).
HEADER_SLACK = MAX_METADATA_BYTES + (256 << 10)
MAX_HEADER = MAX_HEADER_JSON + (64 << 10)  # compressed header bytes (DEFLATE never needs more)
MAX_OBJECTS = MAX_TENSORS + 4  # top level, backbone, extras, metadata, one per tensor
MAX_OBJECT_KEYS = 1024  # keys of one JSON object (the metadata has the most)
MAX_KEY_CHARS = 256
MAX_INT_DIGITS = 20  # sign included: every header integer fits in 64 bits


def inflate_limit(compressed: int) -> int:
    """The most bytes a header of ``compressed`` bytes may inflate to.

    Args:
        compressed: length of the raw DEFLATE header.

    Returns:
        ``min(MAX_HEADER_JSON, HEADER_RATIO * compressed + HEADER_SLACK)``.
    """
    return min(MAX_HEADER_JSON, HEADER_RATIO * compressed + HEADER_SLACK)


def _fail(where: str, msg: str) -> FormatError:
    return FormatError(f"{where}: {msg}")


def inflate(raw: bytes, where: str) -> bytes:
    """Inflate a raw DEFLATE header, refusing output past :func:`inflate_limit`.

    Args:
        raw: the compressed header bytes (already length- and crc-checked).
        where: the file name, for messages.

    Returns:
        The UTF-8 JSON text.
    """
    limit = inflate_limit(len(raw))
    d = zlib.decompressobj(-15)
    try:
        text = d.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise _fail(where, f"header does not decompress ({exc})") from exc
    if len(text) > limit:
        raise _fail(where, f"header is oversized: it inflates past {limit:,} bytes (the limit for a "
                    f"{len(raw):,}-byte header: {HEADER_RATIO} x its size + {HEADER_SLACK:,}, at most "
                    f"{MAX_HEADER_JSON:,}); corrupted or hostile file")
    if not d.eof or d.unused_data:
        raise _fail(where, "header is truncated or followed by garbage")
    return text


class _Counter:
    """JSON hooks that enforce the parse-time limits; they raise FormatError mid-parse."""

    def __init__(self, where: str):
        self.where = where
        self.objects = 0

    def pairs(self, pairs: list[tuple[str, object]]) -> dict:
        self.objects += 1
        if self.objects > MAX_OBJECTS:
            raise _fail(self.where, f"header has more than {MAX_OBJECTS} JSON objects "
                        f"(at most {MAX_TENSORS} tensors); corrupted or hostile file")
        if len(pairs) > MAX_OBJECT_KEYS:
            raise _fail(self.where, f"header has an object with {len(pairs)} keys, more than the limit "
                        f"{MAX_OBJECT_KEYS}")
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise _fail(self.where, f"header repeats the key {dup[:80]!r}: corrupted or hostile file")
        long = next((k for k in out if len(k) > MAX_KEY_CHARS), None)
        if long is not None:
            raise _fail(self.where, f"header has a key of {len(long)} characters, more than the limit "
                        f"{MAX_KEY_CHARS}")
        return out

    def integer(self, s: str) -> int:
        if len(s) > MAX_INT_DIGITS:
            raise _fail(self.where, f"header holds a {len(s)}-digit number, more than the limit "
                        f"{MAX_INT_DIGITS}")
        return int(s)

    def not_integer(self, s: str):
        raise _fail(self.where, f"header holds the number {s[:40]!r}: header numbers are integers")


def loads(text: bytes, where: str) -> dict:
    """Parse inflated header text into a dict, counting objects, keys and digits on the way.

    Args:
        text: UTF-8 JSON (at most :data:`MAX_HEADER_JSON` bytes).
        where: the file name, for messages.

    Returns:
        The header object (not yet validated field by field).
    """
    c = _Counter(where)
    # JSON makes no reference cycles, but a million small lists trigger full collections that
    # walk every object of the process (torch has many): 0.8 s instead of 0.06 s.
    collecting = gc.isenabled()
    gc.disable()
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=c.pairs, parse_int=c.integer,
                            parse_float=c.not_integer, parse_constant=c.not_integer)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(where, f"header is not valid JSON ({str(exc)[:200]})") from exc
    finally:
        if collecting:
            gc.enable()
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object")
    return header
