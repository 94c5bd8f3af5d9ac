"""The ``.mask`` container: bytes in, validated structures out (see docs/format.md).

Layout (all integers little-endian)::

    0   8   magic  b"\\x89MASK\\r\\n\\x1a"
    8   2   u16    format version (2 written; 1 and 2 read)
    10  4   u32    H, length of the compressed header
    14  4   u32    crc32 of those H bytes
    18  H   header: raw DEFLATE of compact UTF-8 JSON
    18+H    data: tensor payloads, then the extras blob; entries tile it exactly up to EOF

The reader treats every file as hostile: it checks sizes before reading or allocating, bounds
the header's decompressed size, validates every header field, requires the entries to tile the
data section (no gaps, overlaps or trailing bytes) and checks each blob's crc32 when it is read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import zstandard

from ..errors import FormatError
from . import bits
from . import header as hdr_limits
from .atomic import atomic_write, write_atomic  # noqa: F401  (the writers live in storage.atomic)
from .codecs import get_codec
from .header import MAX_HEADER, MAX_HEADER_JSON, MAX_METADATA_BYTES, MAX_TENSORS  # noqa: F401

MAGIC = b"\x89MASK\r\n\x1a"
VERSION = 2  # what the writer writes
READ_VERSIONS = (1, 2)  # version 1: extras in 4 byte planes, ans payloads of layout 0
PREAMBLE = struct.Struct("<8sHII")  # magic, version, header length, header crc32
MAX_NUMEL = 1 << 32  # elements of one mask tensor
MAX_NDIM = 8
MAX_NAME_CHARS = 1024  # tensor and backbone names
MAX_METADATA_KEYS = 1024
# Decoding masks allocates one byte per element. Without a backbone nothing else bounds the shapes
# a header declares, so decoding refuses more than this many elements in total unless the caller
# raises the limit (``MaskFile.masks(max_elements=...)``). With a backbone every mask must fit one
# of its tensors and the limit is at least BACKBONE_FACTOR times its element count: mask bytes up
# to twice the backbone's own float32 memory, room for a dispatcher and 7 experts.
MAX_DECODED_ELEMENTS = 1 << 27
BACKBONE_FACTOR = 8
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TENSOR_KEYS = {"name", "shape", "active", "offset", "length", "crc32"}
_BLOB_KEYS = {"offset", "length", "crc32"}
_EXTRAS_KEYS = {"offset", "length", "crc32", "size"}  # version 1; version 2 adds "planes"
EXTRAS_LEVEL = 19
# Byte-plane widths the writer tries for the extras (it keeps the smallest result): 2 suits
# bfloat16 / float16 tensors, 4 float32, 1 leaves the bytes in place.
PLANE_WIDTHS = (2, 4, 1)
# A stored extras blob may expand at most this much (dense float tensors compress ~1.2x): a tiny
# hostile file cannot make the reader allocate gigabytes.
MAX_EXTRAS_EXPANSION = 256
MAX_EXTRAS = 1 << 34
# Decoding extras costs about three times their size: refuse more than this unless the caller
# raises the limit (``MaskFile.read_extras(max_bytes=...)``).
MAX_EXTRAS_DECODED = 64 << 20
_TOP_KEYS = {"backbone", "codec", "tensors", "extras", "metadata"}


@dataclass(frozen=True)
class Entry:
    """One blob in the data section. ``offset`` is relative to the data section's start."""

    offset: int
    length: int
    crc32: int


@dataclass(frozen=True)
class TensorEntry(Entry):
    """A mask tensor: its name, shape and count of active (True) entries."""

    name: str = ""
    shape: tuple[int, ...] = ()
    active: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ExtrasEntry(Entry):
    """The extras blob: ``size`` is the length of the safetensors bytes once decoded, ``planes``
    the byte-plane width they were shuffled with (format version 1: always 4)."""

    size: int = 0
    planes: int = 4


@dataclass
class Container:
    """A parsed, validated ``.mask`` header (no payload has been read yet)."""

    version: int
    backbone_name: str
    backbone_hash: str
    codec: str
    tensors: list[TensorEntry]
    extras: ExtrasEntry | None
    metadata: dict[str, str]
    header: dict = field(repr=False)
    data_offset: int = 0
    file_size: int = 0


# ------------------------------------------------------------------------------------ writing


def build(*, backbone_name: str, backbone_hash: str, codec: str,
          tensors: list[tuple[str, tuple[int, ...], int, bytes]], extras: bytes | None,
          metadata: dict[str, str]) -> bytes:
    """Assemble a complete ``.mask`` file.

    Args:
        tensors: ``(name, shape, active count, encoded payload)`` in file order.
        extras: a safetensors blob, or None; stored byte-shuffled and zstd-compressed
            (:func:`pack_extras`).
    """
    entries, blobs, offset = [], [], 0
    for name, shape, active, payload in tensors:
        entries.append({"name": name, "shape": list(shape), "active": int(active), "offset": offset,
                        "length": len(payload), "crc32": zlib.crc32(payload)})
        blobs.append(payload)
        offset += len(payload)
    extras_entry = None
    if extras is not None:
        stored, planes = pack_extras(extras)
        extras_entry = {"offset": offset, "length": len(stored), "crc32": zlib.crc32(stored),
                        "size": len(extras), "planes": planes}
        blobs.append(stored)
    header = {"backbone": {"name": backbone_name, "sha256": backbone_hash}, "codec": codec,
              "tensors": entries, "extras": extras_entry, "metadata": dict(metadata)}
    _validate(header, sum(len(b) for b in blobs), "<new file>", VERSION)  # never write bad files
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    hdr = packer.compress(text) + packer.flush()
    limit = hdr_limits.inflate_limit(len(hdr))
    if len(text) > limit:
        raise _fail("<new file>", f"the header would inflate from {len(hdr)} to {len(text)} bytes, over the "
                    f"reader's limit {limit}: store fewer tensors or less metadata")
    return PREAMBLE.pack(MAGIC, VERSION, len(hdr), zlib.crc32(hdr)) + hdr + b"".join(blobs)


def encode_extras(blob: bytes, planes: int = 4) -> bytes:
    """Shuffle the bytes into ``planes`` planes (byte k of every ``planes``-byte word together),
    then zstd.

    Trained tensors (head, BN statistics) keep similar sign/exponent bytes next to each other this
    way, which plain zstd cannot reach (ZipNN's byte grouping): about 16% smaller for float32 in 4
    planes, and 2 planes fit bfloat16 (the default extras) 4% better than 4.
    """
    pad = (-len(blob)) % planes
    words = np.frombuffer(blob + b"\0" * pad, dtype=np.uint8).reshape(-1, planes)
    shuffled = np.ascontiguousarray(words.T).tobytes()
    return zstandard.ZstdCompressor(level=EXTRAS_LEVEL, write_content_size=True,
                                    write_checksum=False).compress(shuffled)


def pack_extras(blob: bytes) -> tuple[bytes, int]:
    """The smallest :func:`encode_extras` of ``blob`` over :data:`PLANE_WIDTHS` (the first of equal
    sizes), and its width."""
    return min(((encode_extras(blob, w), w) for w in PLANE_WIDTHS), key=lambda sw: len(sw[0]))


def default_budget(backbone_numel: int = 0) -> int:
    """The default limit on decoded mask elements.

    Args:
        backbone_numel: elements of the backbone the masks are decoded for (0: no backbone).

    Returns:
        ``max(MAX_DECODED_ELEMENTS, BACKBONE_FACTOR * backbone_numel)``.
    """
    return max(MAX_DECODED_ELEMENTS, BACKBONE_FACTOR * backbone_numel)


def check_budget(tensors: list[TensorEntry], max_elements: int, where: str) -> None:
    """Refuse, before anything is read or decompressed, masks of more than ``max_elements`` in total.

    Args:
        tensors: the entries about to be decoded.
        max_elements: the caller's limit (decoding costs about one byte per element).
        where: the file name, for the message.
    """
    total = sum(t.numel for t in tensors)
    if total > max_elements:
        raise _fail(where, f"the masks declare {total:,} elements in total, more than the limit "
                    f"{max_elements:,} (about one byte of memory each): if the file is trusted, pass "
                    f"max_elements={total} (or give the backbone it was made for)")


def check_extras_size(entry: ExtrasEntry, max_bytes: int, where: str) -> None:
    """Refuse extras that declare more than ``max_bytes`` decoded bytes (nothing is read).

    Args:
        entry: the extras entry of the header.
        max_bytes: the caller's limit.
        where: the file name, for the message.
    """
    if entry.size > max_bytes:
        raise _fail(where, f"extras declare {entry.size:,} bytes, more than the limit {max_bytes:,}: if "
                    f"the file is trusted, pass max_bytes={entry.size} to read_extras()")


def decode_extras(stored: bytes, entry: ExtrasEntry, where: str, max_bytes: int) -> bytes:
    """Inverse of :func:`encode_extras`; never produces more than ``entry.size`` (+3) bytes.

    Args:
        stored: the stored blob (crc already checked).
        entry: its header entry.
        where: the file name, for messages.
        max_bytes: refuse (before decompressing) extras that declare more bytes than this (the
            caller's limit; ``MAX_EXTRAS_DECODED`` by default in :mod:`maskpack.io`).

    Returns:
        The safetensors bytes.
    """
    check_extras_size(entry, max_bytes, where)
    width = entry.planes
    padded = entry.size + (-entry.size) % width
    try:
        params = zstandard.get_frame_parameters(stored)
    except zstandard.ZstdError as exc:
        raise _fail(where, f"extras are not a zstd frame ({exc})") from exc
    if params.content_size != padded:
        raise _fail(where, f"extras frame declares {params.content_size} bytes, the header {padded}")
    try:
        planes = zstandard.ZstdDecompressor().decompress(stored, max_output_size=padded)
    except zstandard.ZstdError as exc:
        raise _fail(where, f"extras do not decompress ({exc})") from exc
    if len(planes) != padded:
        raise _fail(where, f"extras decompress to {len(planes)} bytes, expected {padded}")
    out = bytearray(padded)  # un-shuffle into one buffer: at most 2x the size alive at once
    words = np.frombuffer(out, dtype=np.uint8).reshape(-1, width)
    words[:] = np.frombuffer(planes, dtype=np.uint8).reshape(width, -1).T
    del words
    del planes
    del out[entry.size:]
    return bytes(out)


# ------------------------------------------------------------------------------------ reading


def _fail(where: str, msg: str) -> FormatError:
    return FormatError(f"{where}: {msg}")


def parse(path: str | os.PathLike) -> Container:
    """Read and validate the preamble and header of a ``.mask`` file (payloads are not read).

    Args:
        path: the ``.mask`` file.

    Returns:
        The validated :class:`Container`. Every limit of docs/format.md "Validation" that the
        header alone decides has been checked; costs are bounded by the limits in
        :mod:`maskpack.storage.header`, whatever the file declares.
    """
    where = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pre = f.read(PREAMBLE.size)
        if len(pre) < PREAMBLE.size:
            raise _fail(where, f"file is truncated ({size} bytes): not a complete .mask file")
        magic, version, hlen, hcrc = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            raise _fail(where, "not a .mask file (bad magic bytes)")
        if version not in READ_VERSIONS:
            raise _fail(where, f"unsupported .mask format version {version}; this maskpack reads "
                        f"versions {' and '.join(map(str, READ_VERSIONS))}: upgrade maskpack")
        if PREAMBLE.size + hlen > size:
            raise _fail(where, f"header length {hlen} runs past the end of the {size}-byte file "
                        "(truncated or corrupted)")
        if hlen > MAX_HEADER:
            raise _fail(where, f"header length {hlen} is over the limit {MAX_HEADER} (corrupted or "
                        "hostile file)")
        raw = f.read(hlen)
    if len(raw) != hlen:
        raise _fail(where, "file is truncated (it changed while reading?)")
    if zlib.crc32(raw) != hcrc:
        raise _fail(where, "header checksum mismatch: the file is corrupted")
    header = hdr_limits.loads(hdr_limits.inflate(raw, where), where)
    data_len = size - PREAMBLE.size - hlen
    info = _validate(header, data_len, where, version)
    info.data_offset, info.file_size = PREAMBLE.size + hlen, size
    return info


def _int(value, lo: int, hi: int, what: str, where: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(where, f"{what} must be an integer in {lo}..{hi}, got {value!r:.60}")
    return value


def _blob(d, what: str, where: str, keys: set[str]) -> Entry:
    if not isinstance(d, dict) or set(d) != keys:
        raise _fail(where, f"{what} must be an object with keys {sorted(keys)}")
    return Entry(_int(d["offset"], 0, 1 << 62, f"{what} offset", where),
                 _int(d["length"], 0, 1 << 62, f"{what} length", where),
                 _int(d["crc32"], 0, 0xFFFFFFFF, f"{what} crc32", where))


def _extras(d, where: str, version: int) -> ExtrasEntry:
    e = _blob(d, "extras", where, _EXTRAS_KEYS if version == 1 else _EXTRAS_KEYS | {"planes"})
    size = _int(d["size"], 0, MAX_EXTRAS, "extras size", where)
    if size > MAX_EXTRAS_EXPANSION * e.length + 65536:
        raise _fail(where, f"extras declare {size} bytes from a {e.length}-byte blob: refusing "
                    "(corrupted or hostile file)")
    planes = 4 if version == 1 else d["planes"]
    if type(planes) is not int or planes not in PLANE_WIDTHS:
        raise _fail(where, f"extras planes must be one of {sorted(PLANE_WIDTHS)}, got {planes!r:.60}")
    return ExtrasEntry(e.offset, e.length, e.crc32, size, planes)


def _tensor(d, i: int, where: str) -> TensorEntry:
    if not isinstance(d, dict):
        raise _fail(where, f"tensor entry {i} is not an object")
    name = d.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not _utf8(name):
        raise _fail(where, f"tensor entry {i} has no valid name (1 to {MAX_NAME_CHARS} characters)")
    what = f"tensor {name!r}"
    e = _blob(d, what, where, _TENSOR_KEYS)
    shape = d["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _fail(where, f"{what} shape must be a list of at most {MAX_NDIM} sizes")
    shape = tuple(_int(s, 0, MAX_NUMEL, f"{what} shape", where) for s in shape)
    t = TensorEntry(e.offset, e.length, e.crc32, name, shape, 0)
    if t.numel > MAX_NUMEL:
        raise _fail(where, f"{what} declares {t.numel} elements, more than the limit {MAX_NUMEL}")
    active = _int(d["active"], 0, t.numel, f"{what} active count", where)
    return TensorEntry(e.offset, e.length, e.crc32, name, shape, active)


def _utf8(text: str) -> bool:
    """False for strings with lone surrogates (JSON allows them; UTF-8 cannot store them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(meta, where: str) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(where, "header 'metadata' must map strings to strings")
    if len(meta) > MAX_METADATA_KEYS:
        raise _fail(where, f"metadata has {len(meta)} keys, more than the limit {MAX_METADATA_KEYS}")
    total = 0
    for k, v in meta.items():
        if len(k) > hdr_limits.MAX_KEY_CHARS:
            raise _fail(where, f"metadata key {k[:40]!r}... has {len(k)} characters, more than the limit "
                        f"{hdr_limits.MAX_KEY_CHARS}")
        try:
            total += len(k.encode("utf-8")) + len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise _fail(where, f"metadata {k[:40]!r} is not valid Unicode text (lone surrogate)") from None
    if total > MAX_METADATA_BYTES:
        raise _fail(where, f"metadata holds {total} bytes of text, more than the limit {MAX_METADATA_BYTES}")
    return dict(meta)


def _validate(header: dict, data_len: int, where: str, version: int) -> Container:
    if set(header) != _TOP_KEYS:
        raise _fail(where, f"header keys must be {sorted(_TOP_KEYS)}, got {sorted(header)[:10]}")
    bb = header["backbone"]
    if not isinstance(bb, dict) or set(bb) != {"name", "sha256"} or not isinstance(bb["name"], str) \
            or not isinstance(bb["sha256"], str) or not _HEX64.fullmatch(bb["sha256"]):
        raise _fail(where, "header 'backbone' must be {name: str, sha256: 64 lowercase hex digits}")
    if len(bb["name"]) > MAX_NAME_CHARS or not _utf8(bb["name"]):
        raise _fail(where, f"header backbone name must be valid text of at most {MAX_NAME_CHARS} characters")
    codec = header["codec"]
    if not isinstance(codec, str):
        raise _fail(where, "header 'codec' must be a string")
    get_codec(codec)  # CodecError for an unknown codec
    meta = _metadata(header["metadata"], where)
    if not isinstance(header["tensors"], list):
        raise _fail(where, "header 'tensors' must be a list")
    if len(header["tensors"]) > MAX_TENSORS:
        raise _fail(where, f"header lists {len(header['tensors'])} tensors, more than the limit "
                    f"{MAX_TENSORS}")
    tensors = [_tensor(d, i, where) for i, d in enumerate(header["tensors"])]
    extras = None if header["extras"] is None else _extras(header["extras"], where, version)
    _check_tiling(tensors, extras, data_len, codec, where)
    return Container(version, bb["name"], bb["sha256"], codec, tensors, extras, meta, header)


def _check_tiling(tensors: list[TensorEntry], extras: ExtrasEntry | None, data_len: int, codec: str,
                  where: str) -> None:
    seen: set[str] = set()
    pos = 0
    cod = get_codec(codec)
    for t in tensors:
        if t.name in seen:
            raise _fail(where, f"tensor {t.name!r} appears twice")
        seen.add(t.name)
        if t.offset != pos:
            raise _fail(where, f"tensor {t.name!r} starts at {t.offset}, expected {pos}: entries must "
                        "follow each other without gaps or overlaps")
        if codec == "raw" and t.length != bits.packed_size(t.numel):
            raise _fail(where, f"tensor {t.name!r} has shape {list(t.shape)} ({t.numel} bits) but a "
                        f"{t.length}-byte raw payload; expected {bits.packed_size(t.numel)}")
        most = cod.max_elements(t.length)
        if most is not None and t.numel > most:
            raise _fail(where, f"tensor {t.name!r} declares {t.numel} elements, but a {t.length}-byte "
                        f"{codec} payload holds at most {most}: corrupted or hostile file")
        pos += t.length
    if extras is not None:
        if extras.offset != pos:
            raise _fail(where, f"extras start at {extras.offset}, expected {pos}")
        pos += extras.length
    if pos != data_len:
        raise _fail(where, f"entries cover {pos} data bytes but the file holds {data_len}: "
                    "truncated file or trailing garbage")


def read_blob(path: str | os.PathLike, info: Container, entry: Entry, what: str) -> bytes:
    """Read one blob and check its crc32 (FormatError when the file changed or is corrupted)."""
    with open(path, "rb") as f:
        f.seek(info.data_offset + entry.offset)
        data = f.read(entry.length)
    if len(data) != entry.length:
        raise FormatError(f"{os.fspath(path)}: {what} is truncated (file changed while reading?)")
    if zlib.crc32(data) != entry.crc32:
        raise FormatError(f"{os.fspath(path)}: checksum mismatch in {what}: the file is corrupted")
    return data


def read_data(path: str | os.PathLike, info: Container) -> bytes:
    """The whole data section (its size was validated against the file size by :func:`parse`)."""
    with open(path, "rb") as f:
        f.seek(info.data_offset)
        data = f.read(info.file_size - info.data_offset + 1)
    if len(data) != info.file_size - info.data_offset:
        raise FormatError(f"{os.fspath(path)}: the file changed size while reading")
    return data


def blob(path: str | os.PathLike, data: bytes, entry: Entry, what: str) -> bytes:
    """Slice one blob out of the data section and check its crc32."""
    out = data[entry.offset:entry.offset + entry.length]
    if zlib.crc32(out) != entry.crc32:
        raise FormatError(f"{os.fspath(path)}: checksum mismatch in {what}: the file is corrupted")
    return out
