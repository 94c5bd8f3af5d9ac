"""Every rule of docs/format.md's validation list, and every documented error of the loading path,
broken alone.

Each hostile file below differs from a valid one in exactly one rule: the earlier checks pass
(valid checksums, offsets that tile the data section, sizes that agree), so removing that one
check from the reader makes its test fail. Boundary files (8 dimensions, 2^32 elements, a
1024-character name ...) must still be accepted, so an off-by-one in a limit fails too.
"""

import contextlib
import json
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import maskpack
from maskpack.errors import BackboneMismatchError, CodecError, FormatError
from maskpack.storage import container
from maskpack.storage.codecs import get_codec

MAGIC = b"\x89MASK\r\n\x1a"


def _net(shift: float = 0.0) -> nn.Module:
    """Weights that are exactly representable: the same hash everywhere."""
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Conv2d(3, 2, 3, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(((torch.arange(p.numel()) % 7 - 3) * 0.25 + shift).reshape(p.shape))
    return net


def _masks() -> dict[str, torch.Tensor]:
    # 0.weight: 12 bits, 8 active, a 2-byte raw payload; 1.weight: 54 bits, 43 active, 7 bytes
    return {"0.weight": torch.arange(12).reshape(3, 4) % 3 != 0,
            "1.weight": torch.arange(54).reshape(2, 3, 3, 3) % 5 != 1}


def _save(tmp_path, codec: str = "raw", name: str = "good.mask", **kw) -> bytes:
    kw.setdefault("extras", {"head.bias": torch.arange(3.0)})
    kw.setdefault("metadata", {"k": "v"})
    maskpack.save(tmp_path / name, _masks(), _net(), codec=codec, **kw)
    return (tmp_path / name).read_bytes()


def _split(data: bytes) -> tuple[dict, bytes]:
    """The header as a dict and the data section."""
    hlen = struct.unpack("<I", data[10:14])[0]
    return json.loads(zlib.decompress(data[18:18 + hlen], -15)), data[18 + hlen:]


def _deflate(text: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(text) + c.flush()


def _pack(hdr: bytes, section: bytes, *, version: int = 1, crc: int | None = None) -> bytes:
    """A file around an already compressed header (its crc32 is right unless ``crc`` is given)."""
    crc = zlib.crc32(hdr) if crc is None else crc
    return struct.pack("<8sHII", MAGIC, version, len(hdr), crc) + hdr + section


def _rewrite(data: bytes, mutate) -> bytes:
    """Re-pack a file after ``mutate(header)``, with a valid header checksum."""
    header, section = _split(data)
    mutate(header)
    return _pack(_deflate(json.dumps(header).encode()), section)


def _blobs(data: bytes) -> tuple[dict, list[bytes]]:
    header, section = _split(data)
    entries = header["tensors"] + ([header["extras"]] if header["extras"] else [])
    return header, [section[e["offset"]:e["offset"] + e["length"]] for e in entries]


def _replace_blob(data: bytes, index: int, blob: bytes, crc: int | None = None) -> bytes:
    """Put ``blob`` in place of entry ``index`` (tensors, then extras); offsets, lengths and
    checksums are recomputed so the file tiles exactly (``crc``: store this checksum instead)."""
    header, blobs = _blobs(data)
    blobs[index] = blob
    entries = header["tensors"] + ([header["extras"]] if header["extras"] else [])
    pos = 0
    for e, b in zip(entries, blobs, strict=True):
        e.update(offset=pos, length=len(b), crc32=zlib.crc32(b))
        pos += len(b)
    if crc is not None:
        entries[index]["crc32"] = crc
    return _pack(_deflate(json.dumps(header).encode()), b"".join(blobs))


@contextlib.contextmanager
def refused(tmp_path, match: str, err: type[Exception] = FormatError):
    """``pytest.raises(err, match=match)`` whose message must also start with the file's path."""
    with pytest.raises(err, match=match) as info:
        yield info
    assert str(info.value).startswith(str(tmp_path)), f"the message does not name the file: {info.value}"


def _put(tmp_path, data: bytes, name: str = "bad.mask"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _read(tmp_path, data: bytes) -> maskpack.io.MaskFile:
    return maskpack.read(_put(tmp_path, data))


def _load_all(tmp_path, data: bytes, backbone=None) -> dict:
    mf = _read(tmp_path, data)
    masks = mf.masks(_net() if backbone is None else backbone)
    return {"masks": masks, "extras": mf.extras}


@pytest.fixture
def good(tmp_path) -> bytes:
    return _save(tmp_path)


@pytest.fixture
def good_zstd(tmp_path) -> bytes:
    return _save(tmp_path, "zstd", name="good_zstd.mask")


def test_the_valid_file_passes_every_stage(tmp_path, good, good_zstd):
    for data in (good, good_zstd):
        got = _load_all(tmp_path, data)
        assert all(torch.equal(got["masks"][k], v) for k, v in _masks().items())
        assert torch.equal(got["extras"]["head.bias"], torch.arange(3.0))
    assert isinstance(maskpack.load(_put(tmp_path, good), _net()), nn.Module)


# ----------------------------------------------------------------------------------- preamble


def test_wrong_magic(tmp_path, good):
    for magic in (b"\x89MASX\r\n\x1a", b"\x89MASK\n\x1a\x00"):  # a text-mode transfer rewrites \r\n
        with refused(tmp_path, r"not a \.mask file \(bad magic bytes\)"):
            _read(tmp_path, magic + good[8:])


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_unsupported_version(tmp_path, good, version):
    with refused(tmp_path, f"unsupported .mask format version {version}; this maskpack "
                                          "reads version 1"):
        _read(tmp_path, good[:8] + struct.pack("<H", version) + good[10:])


@pytest.mark.parametrize("cut", [0, 8, 17])
def test_file_shorter_than_the_preamble(tmp_path, good, cut):
    with refused(tmp_path, rf"file is truncated \({cut} bytes\)"):
        _read(tmp_path, good[:cut])


def test_header_length_past_the_end(tmp_path, good):
    hlen = struct.unpack("<I", good[10:14])[0]
    cut = good[:18 + hlen - 1]  # the header's last byte is missing
    with refused(tmp_path, f"header length {hlen} runs past the end of the {len(cut)}-byte"):
        _read(tmp_path, cut)


def _padded_header(good: bytes, target: int) -> bytes:
    """A stored (level 0) DEFLATE header of exactly ``target`` bytes: the valid JSON plus spaces."""
    text = json.dumps(_split(good)[0]).encode()
    pad = target - len(text)
    for _ in range(8):
        hdr = _deflate(text + b" " * pad, level=0)
        if len(hdr) == target:
            return hdr
        pad -= len(hdr) - target
    raise AssertionError("could not size the header")


def test_header_length_over_the_limit(tmp_path, good, monkeypatch):
    # A valid header, only longer than the cap (lowered here so the files stay small): it would
    # parse if the cap were gone. A header of exactly the cap is accepted.
    monkeypatch.setattr(container, "MAX_HEADER", 4096)
    section = _split(good)[1]
    assert _read(tmp_path, _pack(_padded_header(good, 4096), section)).codec == "raw"
    with refused(tmp_path, r"header length 4097 is over the limit 4096 \(corrupted"):
        _read(tmp_path, _pack(_padded_header(good, 4097), section))


def test_header_checksum_mismatch(tmp_path, good):
    crc = struct.unpack("<I", good[14:18])[0]
    with refused(tmp_path, "header checksum mismatch: the file is corrupted"):
        _read(tmp_path, good[:14] + struct.pack("<I", crc ^ 1) + good[18:])


# ------------------------------------------------------------------------------------- header


def test_header_that_does_not_inflate(tmp_path, good):
    with refused(tmp_path, "header does not decompress"):
        _read(tmp_path, _pack(b"\xff\xff\xff\xff", _split(good)[1]))


def test_header_whose_deflate_stream_does_not_end(tmp_path, good):
    header, section = _split(good)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(json.dumps(header).encode()) + c.flush(zlib.Z_SYNC_FLUSH)  # all bytes, no end
    with refused(tmp_path, "header is truncated"):
        _read(tmp_path, _pack(hdr, section))


def test_header_followed_by_garbage(tmp_path, good):
    header, section = _split(good)
    with refused(tmp_path, "header is .*followed by garbage"):
        _read(tmp_path, _pack(_deflate(json.dumps(header).encode()) + b"\x00junk", section))


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000],
                         ids=["syntax", "utf8", "nesting"])
def test_header_that_is_not_json(tmp_path, good, text):
    with refused(tmp_path, "header is not valid JSON"):
        _read(tmp_path, _pack(_deflate(text), _split(good)[1]))


@pytest.mark.parametrize("text", [b"[1, 2]", b'"backbone"', b"7", b"null"])
def test_header_that_is_not_an_object(tmp_path, good, text):
    with refused(tmp_path, "header is not a JSON object"):
        _read(tmp_path, _pack(_deflate(text), _split(good)[1]))


KEYS = "['backbone', 'codec', 'extras', 'metadata', 'tensors']"
BACKBONE = "header 'backbone' must be {name: str, sha256: 64 lowercase hex digits}"
TENSOR_KEYS = "['active', 'crc32', 'length', 'name', 'offset', 'shape']"
EXTRAS_KEYS = "['crc32', 'length', 'offset', 'size']"
T0 = "tensor '0.weight'"
OFFSET = f"{T0} offset must be an integer in 0..{1 << 62}"
LENGTH = f"{T0} length must be an integer in 0..{1 << 62}"
CRC = f"{T0} crc32 must be an integer in 0..{0xFFFFFFFF}"
DIM = f"{T0} shape must be an integer in 0..{1 << 32}"
NDIM = f"{T0} shape must be a list of at most 8 sizes"
ACTIVE = f"{T0} active count must be an integer in 0..12"
SIZE = f"extras size must be an integer in 0..{1 << 34}"


def _set(path: str, value):
    """A mutation that sets ``header[a][b]...`` (path ``a/b``; list indices as numbers)."""
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]

    def mutate(h):
        for p in parents:
            h = h[p]
        h[leaf] = value
    return mutate


def _pop(path: str):
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]

    def mutate(h):
        for p in parents:
            h = h[p]
        del h[leaf]
    return mutate


HEADER_CASES = [
    ("missing key", _pop("metadata"), f"header keys must be {KEYS}, got "
                                      "['backbone', 'codec', 'extras', 'tensors']"),
    ("extra key", _set("note", "x"), f"header keys must be {KEYS}, got "
                                     "['backbone', 'codec', 'extras', 'metadata', 'note', 'tensors']"),
    ("backbone not an object", _set("backbone", "efficientnet_lite0"), BACKBONE),
    ("backbone extra key", _set("backbone/url", "x"), BACKBONE),
    ("backbone missing name", _pop("backbone/name"), BACKBONE),
    ("backbone name not str", _set("backbone/name", 5), BACKBONE),
    ("sha256 not str", _set("backbone/sha256", 5), BACKBONE),
    ("sha256 uppercase", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"].upper()), BACKBONE),
    ("sha256 63 digits", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"][1:]), BACKBONE),
    ("sha256 65 digits", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"] + "0"), BACKBONE),
    ("sha256 not hex", _set("backbone/sha256", "g" * 64), BACKBONE),
    ("codec not str", _set("codec", 5), "header 'codec' must be a string"),
    ("codec null", _set("codec", None), "header 'codec' must be a string"),
    ("metadata not object", _set("metadata", ["k", "v"]), "header 'metadata' must map strings to strings"),
    ("metadata number", _set("metadata/k", 1), "header 'metadata' must map strings to strings"),
    ("metadata null", _set("metadata/k", None), "header 'metadata' must map strings to strings"),
    ("tensors not list", _set("tensors", {}), "header 'tensors' must be a list"),
    ("entry not object", _set("tensors/0", ["0.weight"]), "tensor entry 0 is not an object"),
    ("name empty", _set("tensors/0/name", ""), "tensor entry 0 has no valid name"),
    ("name not str", _set("tensors/1/name", 7), "tensor entry 1 has no valid name"),
    ("name missing", _pop("tensors/0/name"), "tensor entry 0 has no valid name"),
    ("name too long", _set("tensors/0/name", "x" * 1025), "tensor entry 0 has no valid name"),
    ("entry extra key", _set("tensors/0/note", 1), f"{T0} must be an object with keys {TENSOR_KEYS}"),
    ("entry missing key", _pop("tensors/0/crc32"), f"{T0} must be an object with keys {TENSOR_KEYS}"),
    ("offset string", _set("tensors/0/offset", "0"), f"{OFFSET}, got '0'"),
    ("offset bool", _set("tensors/0/offset", False), f"{OFFSET}, got False"),
    ("offset negative", _set("tensors/0/offset", -1), f"{OFFSET}, got -1"),
    ("offset huge", _set("tensors/0/offset", (1 << 62) + 1), OFFSET),
    ("length null", _set("tensors/0/length", None), f"{LENGTH}, got None"),
    ("length string", _set("tensors/0/length", "2"), f"{LENGTH}, got '2'"),
    ("crc32 negative", _set("tensors/0/crc32", -1), f"{CRC}, got -1"),
    ("crc32 over 32 bits", lambda h: h["tensors"][0].update(crc32=h["tensors"][0]["crc32"] + (1 << 32)),
     CRC),
    ("crc32 list", _set("tensors/0/crc32", [1]), CRC),
    ("shape not list", _set("tensors/0/shape", "3x4"), NDIM),
    ("shape 9 dims", _set("tensors/0/shape", [1] * 7 + [3, 4]), NDIM),
    ("shape bool", _set("tensors/0/shape", [3, True]), f"{DIM}, got True"),
    ("shape negative", _set("tensors/0/shape", [-3, -4]), f"{DIM}, got -3"),
    ("active negative", _set("tensors/0/active", -1), f"{ACTIVE}, got -1"),
    ("active over numel", _set("tensors/0/active", 13), f"{ACTIVE}, got 13"),
    ("active string", _set("tensors/0/active", "8"), f"{ACTIVE}, got '8'"),
    ("extras not object", _set("extras", [1]), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras extra key", _set("extras/note", 1), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras missing size", _pop("extras/size"), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras size negative", _set("extras/size", -1), f"{SIZE}, got -1"),
    ("extras size bool", _set("extras/size", True), SIZE),
    ("extras offset null", _set("extras/offset", None), f"extras offset must be an integer in 0..{1 << 62}"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_header_field(tmp_path, good, mutate, match):
    with refused(tmp_path, re.escape(match)):
        _read(tmp_path, _rewrite(good, mutate))


def test_unknown_codec_is_a_codec_error(tmp_path, good):
    with pytest.raises(CodecError, match="unknown codec 'brotli': use one of raw, gzip"):
        _read(tmp_path, _rewrite(good, _set("codec", "brotli")))


@pytest.mark.parametrize("mutate", [
    _set("tensors/0/name", "x" * 1024),  # the longest name allowed
    _set("tensors/0/shape", [1] * 6 + [3, 4]),  # 8 dimensions
    _set("tensors/0/active", 12), _set("tensors/0/active", 0),  # the ends of the active range
    _set("tensors/0/crc32", 0xFFFFFFFF), _set("tensors/0/crc32", 0),  # wrong, but only found when read
    _set("metadata", {}),
], ids=["name 1024", "8 dims", "active numel", "active 0", "crc32 max", "crc32 0", "no metadata"])
def test_header_values_at_the_limits_are_accepted(tmp_path, good, mutate):
    mf = _read(tmp_path, _rewrite(good, mutate))
    assert len(mf.tensors) == 2


def test_eight_dimensions_decode(tmp_path, good):
    mf = _read(tmp_path, _rewrite(good, _set("tensors/0/shape", [1] * 6 + [3, 4])))
    got = mf.masks()["0.weight"]
    assert got.shape == (1,) * 6 + (3, 4) and torch.equal(got.reshape(3, 4), _masks()["0.weight"])


def test_tensor_over_2_32_elements(tmp_path):
    # lzma: no expansion bound ties the payload length to the shape, so only this rule applies
    good_lzma = _save(tmp_path, "lzma", name="good_lzma.mask")
    ok = _rewrite(good_lzma, _set("tensors/0/shape", [1 << 16, 1 << 16]))
    assert _read(tmp_path, ok).tensors[0].numel == 1 << 32
    bad = _rewrite(good_lzma, _set("tensors/0/shape", [1 << 16, (1 << 16) + 1]))
    with refused(tmp_path, f"{T0} declares {(1 << 32) + (1 << 16)} elements, more than the "
                                          f"limit {1 << 32}"):
        _read(tmp_path, bad)


def test_dimension_over_2_32(tmp_path, good_zstd):
    ok = _rewrite(good_zstd, lambda h: h["tensors"][0].update(shape=[1 << 32, 0], active=0))
    assert _read(tmp_path, ok).tensors[0].shape == (1 << 32, 0)
    bad = _rewrite(good_zstd, lambda h: h["tensors"][0].update(shape=[(1 << 32) + 1, 0], active=0))
    with refused(tmp_path, re.escape(f"{DIM}, got "
                                                    f"{(1 << 32) + 1}")):
        _read(tmp_path, bad)


def test_duplicated_name(tmp_path, good):
    # the second tensor renamed: offsets, lengths and raw sizes all still agree
    with refused(tmp_path, f"{T0} appears twice"):
        _read(tmp_path, _rewrite(good, _set("tensors/1/name", "0.weight")))


def test_raw_payload_length_disagrees_with_the_shape(tmp_path, good):
    with refused(tmp_path, re.escape(f"{T0} has shape [3, 40] (120 bits) but a 2-byte raw "
                                                    "payload; expected 15")):
        _read(tmp_path, _rewrite(good, _set("tensors/0/shape", [3, 40])))


# ------------------------------------------------------------------------------ tiling


def _with_gap(good: bytes) -> bytes:
    """One spare byte between the two tensors; every later offset moved to match."""
    header, blobs = _blobs(good)
    header["tensors"][1]["offset"] += 1
    header["extras"]["offset"] += 1
    section = blobs[0] + b"\x00" + b"".join(blobs[1:])
    return _pack(_deflate(json.dumps(header).encode()), section)


def test_entries_with_a_gap(tmp_path, good):
    with refused(tmp_path, "tensor '1.weight' starts at 3, expected 2: entries must follow "
                                          "each other without gaps or overlaps"):
        _read(tmp_path, _with_gap(good))


def test_entries_that_overlap(tmp_path, good):
    with refused(tmp_path, "tensor '1.weight' starts at 1, expected 2"):
        _read(tmp_path, _rewrite(good, _set("tensors/1/offset", 1)))


def test_extras_that_do_not_follow_the_tensors(tmp_path, good):
    with refused(tmp_path, "extras start at 10, expected 9"):
        _read(tmp_path, _rewrite(good, _set("extras/offset", 10)))


def test_entries_that_run_past_the_end(tmp_path, good):
    header, _ = _split(good)
    n = header["extras"]["offset"] + header["extras"]["length"]
    with refused(tmp_path, f"entries cover {n} data bytes but the file holds {n - 1}: "
                                          "truncated file"):
        _read(tmp_path, good[:-1])  # the last byte of the extras is missing


def test_trailing_bytes(tmp_path, good):
    n = sum(len(b) for b in _blobs(good)[1])
    with refused(tmp_path, f"entries cover {n} data bytes but the file holds {n + 1}: "
                                          ".*trailing garbage"):
        _read(tmp_path, good + b"\x00")


def test_no_tensors_and_no_extras_is_a_valid_empty_file(tmp_path, good):
    empty = _pack(_deflate(json.dumps({**_split(good)[0], "tensors": [], "extras": None}).encode()), b"")
    mf = _read(tmp_path, empty)
    assert mf.masks() == {} and mf.extras == {}
    with refused(tmp_path, "entries cover 0 data bytes but the file holds 1"):
        _read(tmp_path, empty + b"\x00")


# ------------------------------------------------------------------ payloads (checked when read)


def _swap_bits(payload: bytes) -> bytes:
    """Move one set bit of the first byte to an unset position: same popcount, same padding."""
    b = payload[0]
    one = next(i for i in range(8) if b >> i & 1)
    zero = next(i for i in range(8) if not b >> i & 1)
    return bytes([b ^ (1 << one) ^ (1 << zero)]) + payload[1:]


def test_payload_checksum(tmp_path, good):
    header, blobs = _blobs(good)
    # a changed payload with the old checksum: decodes to the same active count, so only the
    # checksum can tell
    bad = _replace_blob(good, 0, _swap_bits(blobs[0]), crc=header["tensors"][0]["crc32"])
    mf = _read(tmp_path, bad)  # read() parses the header only
    with refused(tmp_path, "checksum mismatch in tensor '0.weight': the file is corrupted"):
        mf.masks()
    with refused(tmp_path, "checksum mismatch in tensor '0.weight'"):
        mf.verify()


def test_extras_checksum(tmp_path, good):
    header, blobs = _blobs(good)
    stored = blobs[-1]
    changed = stored[:-1] + bytes([stored[-1] ^ 0x01])
    bad = _replace_blob(good, len(blobs) - 1, changed, crc=header["extras"]["crc32"])
    mf = _read(tmp_path, bad)
    assert set(mf.masks()) == {"0.weight", "1.weight"}  # the masks are fine
    with refused(tmp_path, "checksum mismatch in extras: the file is corrupted"):
        mf.extras  # noqa: B018


def test_decoded_active_count_differs_from_the_header(tmp_path, good):
    mf = _read(tmp_path, _rewrite(good, _set("tensors/0/active", 7)))
    with refused(tmp_path, "mask '0.weight' decodes to 8 active entries, the header says 7"):
        mf.masks()


def test_raw_payload_with_padding_bits_set(tmp_path, good):
    header, blobs = _blobs(good)
    padded = blobs[0][:1] + bytes([blobs[0][1] | 0x80])  # bit 15 of a 12-bit mask
    mf = _read(tmp_path, _replace_blob(good, 0, padded))
    with pytest.raises(CodecError, match="packed mask has non-zero padding bits"):
        mf.masks()


def test_file_that_changes_size_after_it_was_read(tmp_path, good):
    for changed in (good + b"\x00", good[:-1]):
        mf = _read(tmp_path, good)
        _put(tmp_path, changed)
        with refused(tmp_path, "the file changed size while reading"):
            mf.masks()


def test_read_blob_checks_length_and_checksum(tmp_path, good):
    path = _put(tmp_path, good)
    info = container.parse(path)
    assert container.read_blob(path, info, info.tensors[1], "t") == _blobs(good)[1][1]
    wrong = container.Entry(info.tensors[1].offset, info.tensors[1].length, info.tensors[1].crc32 ^ 1)
    with refused(tmp_path, "checksum mismatch in t: the file is corrupted"):
        container.read_blob(path, info, wrong, "t")
    _put(tmp_path, good[:-4])
    with refused(tmp_path, "extras is truncated"):
        container.read_blob(path, info, info.extras, "extras")


# --------------------------------------------------------- codec payloads: exactly the shape's bits


def _compressors():
    import bz2
    import gzip
    import lzma

    import lz4.block
    import snappy
    import zstandard

    def lzma_raw(b: bytes) -> bytes:
        return lzma.compress(b, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": 4096}])

    return {"gzip": lambda b: gzip.compress(b, 6, mtime=0), "bz2": lambda b: bz2.compress(b, 1),
            "lzma": lzma_raw, "lz4": lambda b: lz4.block.compress(b, store_size=False),
            "snappy": snappy.compress,
            "zstd": lambda b: zstandard.ZstdCompressor(level=3, write_content_size=True).compress(b)}


COMPRESSORS = _compressors()
TOO_MANY = {"gzip": "more than the expected 2 bytes", "bz2": "more than the expected 2 bytes",
            "lzma": "more than the expected 2 bytes", "lz4": "lz4 payload does not decode",
            "snappy": "snappy payload declares 3 bytes, expected 2",
            "zstd": "zstd payload declares 3 bytes, expected 2"}
TOO_FEW = {"gzip": "gzip payload decodes to 1 bytes, expected 2", "bz2": "bz2 payload decodes to 1 bytes",
           "lzma": "lzma payload decodes to 1 bytes", "lz4": "lz4 payload decodes to 1 bytes, expected 2",
           "snappy": "snappy payload declares 1 bytes, expected 2",
           "zstd": "zstd payload declares 1 bytes, expected 2"}
TRAILING = {"gzip": "gzip payload has trailing bytes", "bz2": "payload has trailing bytes",
            "lzma": "payload has trailing bytes", "zstd": "zstd payload has trailing bytes after the frame"}
TRUNCATED = {"gzip": "gzip payload is truncated", "bz2": "payload is truncated",
             "lzma": "payload is truncated", "zstd": "zstd payload is truncated"}


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_payload_with_more_or_fewer_bits_than_the_shape(codec):
    # 12 bits need 2 packed bytes; payloads of 3 and 1 bytes are refused
    c, comp = get_codec(codec), COMPRESSORS[codec]
    assert np.flatnonzero(c.decode(comp(b"\x09\x05"), 12)).tolist() == [0, 3, 8, 10]
    with pytest.raises(CodecError, match=TOO_MANY[codec]):
        c.decode(comp(b"\x09\x05\x00"), 12)
    with pytest.raises(CodecError, match=TOO_FEW[codec]):
        c.decode(comp(b"\x09"), 12)


@pytest.mark.parametrize("codec", sorted(TRAILING))
def test_payload_with_trailing_bytes_or_cut_short(codec):
    c, payload = get_codec(codec), COMPRESSORS[codec](b"\x09\x05")
    with pytest.raises(CodecError, match=TRAILING[codec]):
        c.decode(payload + payload, 12)
    with pytest.raises(CodecError, match=TRUNCATED[codec]):
        c.decode(payload[:-1], 12)


def test_lz4_and_snappy_refuse_trailing_bytes():
    for codec in ("lz4", "snappy"):
        payload = COMPRESSORS[codec](b"\x09\x05")
        with pytest.raises(CodecError, match=f"{codec} payload does not decode"):
            get_codec(codec).decode(payload + b"\x00\x00", 12)
    assert get_codec("lz4").decode(b"\x00", 0).size == 0
    with pytest.raises(CodecError, match="lz4 payload of an empty mask must be one zero byte"):
        get_codec("lz4").decode(b"\x00\x00", 0)


BOMB = 4 << 20  # bytes a hostile payload inflates to; the caps keep allocation near the 13 expected


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_decompressors_never_inflate_past_the_expected_size(codec):
    import zstandard

    payloads = [COMPRESSORS[codec](b"\x00" * BOMB)]
    if codec == "zstd":  # a frame that does not declare its size
        payloads.append(zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * BOMB))
    for payload in payloads:
        tracemalloc.start()
        try:
            with pytest.raises(CodecError):
                get_codec(codec).decode(payload, 100)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < BOMB // 4, f"{codec} allocated {peak} bytes for a 13-byte mask"


# -------------------------------------------------------------------------------------- ans


def _ans_file(tmp_path) -> bytes:
    return _save(tmp_path, "ans", name="ans.mask")


def test_ans_bucket_count_larger_than_its_bucket(tmp_path):
    data = _ans_file(tmp_path)
    # one bucket (log2 B = 0) of 12 elements claiming 13 ones, no coded words
    mf = _read(tmp_path, _replace_blob(data, 0, bytes([0, 13])))
    with pytest.raises(CodecError, match="ans bucket 0 claims 13 ones but holds 12 elements"):
        mf.masks(_net())


def test_ans_more_coded_entries_than_the_payload_allows():
    absw = np.ones(1 << 20, dtype=np.float32)
    # 2^19 ones in one bucket of 2^20: 2^19 coded gaps from 4 bytes of words
    payload = bytes([0, 0x80, 0x80, 0x20]) + b"\x01\x00\x00\x00"
    with pytest.raises(CodecError, match="ans payload claims more coded entries than its size allows"):
        get_codec("ans").decode(payload, 1 << 20, absw)
    # a 7-byte payload may code at most 32 * 7 + 256 = 480 entries: 480 is decoded, 481 refused
    def payload_with(ones: int) -> bytes:
        return bytes([0, ones & 0x7F | 0x80, ones >> 7]) + b"\x01\x00\x00\x00"

    assert int(get_codec("ans").decode(payload_with(480), 1 << 20, absw).sum()) == 480
    with pytest.raises(CodecError, match="ans payload claims more coded entries than its size allows"):
        get_codec("ans").decode(payload_with(481), 1 << 20, absw)


@pytest.mark.parametrize("payload,match", [
    (b"", "ans payload is empty"),
    (bytes([5, 0]), "ans payload declares 32 buckets; at most 16 are allowed"),
    (bytes([1, 3]), "ans payload is truncated inside its bucket counts"),
    (bytes([0]) + b"\x80" * 10, "ans payload has a malformed bucket count"),
    (bytes([0, 3, 1]), "ans payload's coded part is not a whole number of 32-bit words"),
    (bytes([0, 0]) + b"\x01\x00\x00\x00", "ans payload has coded data but its bucket counts need none"),
])
def test_ans_payload_rules(payload, match):
    absw = np.linspace(0, 1, 12, dtype=np.float32)
    with pytest.raises(CodecError, match=re.escape(match)):
        get_codec("ans").decode(payload, 12, absw)


# --------------------------------------------------------------------------------- backbone


def test_mask_that_does_not_fit_the_backbone(tmp_path, good):
    # same element count, another shape: the raw payload and every checksum are still right
    for data in (good, _ans_file(tmp_path)):
        mf = _read(tmp_path, _rewrite(data, _set("tensors/0/shape", [4, 3])))
        with refused(tmp_path, re.escape("mask '0.weight' [4, 3] does not fit the backbone "
                                                        "([3, 4])")):
            mf.masks(_net())
        mf = _read(tmp_path, _rewrite(data, _set("tensors/1/name", "2.weight")))
        with refused(tmp_path, re.escape("mask '2.weight' [2, 3, 3, 3] does not fit the "
                                                        "backbone (missing)")):
            mf.masks(_net())


def test_backbone_whose_hash_differs(tmp_path, good):
    other = _net(shift=0.5)
    stored, actual = maskpack.backbone_hash(_net()), maskpack.backbone_hash(other)
    path = _put(tmp_path, good)
    msg = (f"was made for backbone 'Sequential' (sha256 {stored}), but the given backbone 'Sequential' "
           f"has sha256 {actual}")
    for call in (lambda: maskpack.read(path).masks(other), lambda: maskpack.load(path, other),
                 lambda: maskpack.read(path).check_backbone(other)):
        with pytest.raises(BackboneMismatchError, match=re.escape(msg)) as info:
            call()
        assert (info.value.expected, info.value.actual, info.value.backbone_name) == (stored, actual,
                                                                                    "Sequential")
    # check_hash=False skips only the hash: the shapes fit, so the masks decode
    assert set(maskpack.read(path).masks(other, check_hash=False)) == {"0.weight", "1.weight"}


def test_ans_needs_the_backbone(tmp_path):
    mf = _read(tmp_path, _ans_file(tmp_path))
    with refused(tmp_path, re.escape("codec 'ans' needs the backbone to decode masks: call "
                                                    "masks(load_backbone('Sequential'))")):
        mf.masks()


# ------------------------------------------------------------------------------------ extras


def test_extras_that_are_not_a_zstd_frame(tmp_path, good):
    bad = _replace_blob(good, 2, b"\x00" * 16)
    with refused(tmp_path, "extras are not a zstd frame"):
        _read(tmp_path, bad).extras  # noqa: B018


def test_extras_frame_size_disagrees_with_the_header(tmp_path, good):
    bad = _rewrite(good, lambda h: h["extras"].update(size=h["extras"]["size"] + 4))
    size = _split(good)[0]["extras"]["size"]
    with refused(tmp_path, f"extras frame declares {size} bytes, the header {size + 4}"):
        _read(tmp_path, bad).extras  # noqa: B018


def test_extras_that_do_not_decompress(tmp_path, good):
    import zstandard

    header, blobs = _blobs(good)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x01" * 64)
    bad = _replace_blob(good, 2, frame[:-3], crc=None)
    bad = _rewrite(bad, _set("extras/size", 64))
    with refused(tmp_path, "extras do not decompress"):
        _read(tmp_path, bad).extras  # noqa: B018


def test_extras_declaring_an_absurd_expansion(tmp_path, good):
    from safetensors.torch import save as st_save

    # a valid safetensors blob (1 MiB of zeros) that compresses to a few hundred bytes: only
    # the expansion rule refuses it, before anything is decompressed
    blob = st_save({"head.bias": torch.zeros(1 << 18)})
    stored = container.encode_extras(blob)
    bad = _rewrite(_replace_blob(good, 2, stored), _set("extras/size", len(blob)))
    with refused(tmp_path, f"extras declare {len(blob)} bytes from a {len(stored)}-byte blob: "
                                          "refusing"):
        _read(tmp_path, bad)


def test_extras_expansion_limit_is_exact(tmp_path, good):
    length = _split(good)[0]["extras"]["length"]
    limit = container.MAX_EXTRAS_EXPANSION * length + 65536
    assert _read(tmp_path, _rewrite(good, _set("extras/size", limit))).tensors  # header-only check
    with refused(tmp_path, f"extras declare {limit + 1} bytes from a {length}-byte blob"):
        _read(tmp_path, _rewrite(good, _set("extras/size", limit + 1)))


def test_extras_that_are_not_safetensors(tmp_path, good):
    junk = b"\x08" + b"\x00" * 40
    bad = _rewrite(_replace_blob(good, 2, container.encode_extras(junk)), _set("extras/size", len(junk)))
    with refused(tmp_path, "extras are not a valid safetensors blob"):
        _read(tmp_path, bad).extras  # noqa: B018


# ---------------------------------------------------------------------------- the loading path


def test_bad_mask_scale_metadata(tmp_path, good):
    for value, scale in (("true", True), ("FALSE", False), (" 1 ", True), ("0", False)):
        assert _read(tmp_path, _rewrite(good, _set("metadata/mask.scale", value))).scale is scale
    path = _put(tmp_path, _rewrite(good, _set("metadata/mask.scale", "maybe")))
    with refused(tmp_path, "metadata 'mask.scale' must be 'true' or 'false', got 'maybe'"):
        maskpack.load(path, _net())


def test_load_refuses_a_cascade_file(tmp_path, good):
    path = _put(tmp_path, _rewrite(good, _set("metadata/cascade.format", "maskpack-cascade")))
    with refused(tmp_path, "holds a cascade .* load it with maskpack.load_cascade"):
        maskpack.load(path, _net())


NO_SUCH = "does not exist in this backbone; was the mask made for another architecture?"


@pytest.mark.parametrize("extras,match", [
    ({"other.x": torch.zeros(3)}, "extra tensor 'other.x' is neither 'backbone.*' nor 'head.*'"),
    ({"backbone.9.weight": torch.zeros(3)}, f"extra tensor '9.weight' {NO_SUCH}"),
    ({"backbone.0.nope": torch.zeros(3)}, f"extra tensor '0.nope' {NO_SUCH}"),
    ({"backbone.0.weight": torch.zeros(4, 3)},
     "extra tensor 'backbone.0.weight' has shape (4, 3), the backbone's has (3, 4)"),
    ({"head.weight": torch.zeros(5)}, "extra 'head.weight' must be 2-D (classes, features), got shape (5,)"),
    ({"head.weight": torch.zeros(5, 2), "head.bias": torch.zeros(4)},
     "extra 'head.bias' has shape (4,), expected (5,)"),
], ids=["prefix", "module", "leaf", "shape", "head 1-D", "bias"])
def test_extras_that_do_not_fit_the_model(tmp_path, extras, match):
    maskpack.save(tmp_path / "t.mask", _masks(), _net(), extras=extras)
    with pytest.raises(FormatError, match=re.escape(match)):
        maskpack.load(tmp_path / "t.mask", _net())


def test_load_with_extras_over_the_backbone(tmp_path):
    extras = {"backbone.0.weight": torch.full((3, 4), 2.0), "head.weight": torch.ones(5, 2)}
    maskpack.save(tmp_path / "t.mask", _masks(), _net(), extras=extras, metadata={"mask.scale": "false"})
    model = maskpack.load(tmp_path / "t.mask", _net())
    # extras are applied after the masks: the stored tensor wins, the masked one is baked
    assert torch.equal(model.backbone[0].weight, torch.full((3, 4), 2.0))
    assert torch.equal(model.backbone[1].weight, _net()[1].weight * _masks()["1.weight"])
    assert model.head.weight.shape == (5, 2) and model.head.bias is None
    assert not model.training and not any(p.requires_grad for p in model.parameters())
