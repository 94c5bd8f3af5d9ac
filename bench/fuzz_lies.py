"""Hand-made lies for bench/fuzz.py: files that are well formed where it is cheap to be and lie
where a trusting reader would pay (shapes, sizes, counts, nesting). See docs/format.md.

Every lie is ``fn(rng, seeds) -> bytes`` (``seeds``: real files by codec, which supply a backbone
name and hash that match the fuzz backbone). Lies in :data:`HEAVY` take long to build (large
zero streams compressed once and cached) or to refuse; the unit tests leave them out.
"""

from __future__ import annotations

import bz2
import functools
import json
import lzma
import random
import struct
import zlib

import zstandard

from maskpack.storage.container import MAGIC, VERSION  # lies look like the writer's files

MB = 1 << 20


def split(data: bytes) -> tuple[dict, int, bytes]:
    """(header dict, compressed header length, data section) of a well-formed file."""
    hlen = struct.unpack("<I", data[10:14])[0]
    return json.loads(zlib.decompress(data[18:18 + hlen], -15)), hlen, data[18 + hlen:]


def _deflate(chunks) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return b"".join(c.compress(ch) for ch in chunks) + c.flush()


def pack_raw_header(hdr: bytes, body: bytes, version: int = VERSION) -> bytes:
    """A file from an already compressed header (valid crc)."""
    return struct.pack("<8sHII", MAGIC, version, len(hdr), zlib.crc32(hdr)) + hdr + body


def pack(text: bytes, body: bytes, version: int = VERSION) -> bytes:
    """A file from header text and a data section, with a valid header checksum."""
    return pack_raw_header(_deflate([text]), body, version)


def _file(seeds: dict[str, bytes], codec: str, tensors: list[tuple[str, list[int], int, bytes]],
          metadata: dict | None = None) -> bytes:
    """A file whose entries tile the data section: (name, shape, active, payload) per tensor."""
    bb = split(seeds["raw"])[0]["backbone"]
    entries, body = [], bytearray()
    for name, shape, active, payload in tensors:
        entries.append({"name": name, "shape": shape, "active": active, "offset": len(body),
                        "length": len(payload), "crc32": zlib.crc32(payload)})
        body += payload
    h = {"backbone": bb, "codec": codec, "tensors": entries, "extras": None, "metadata": metadata or {}}
    return pack(json.dumps(h, separators=(",", ":")).encode(), bytes(body))


@functools.cache
def zeros(codec: str, nbytes: int) -> bytes:
    """A valid payload of ``nbytes`` zero bytes (packed bits), built in 1 MiB steps."""
    step = b"\0" * min(nbytes, MB)
    chunks = [step] * (nbytes // len(step)) + [b"\0" * (nbytes % len(step))] if nbytes else []
    if codec == "zstd":
        c = zstandard.ZstdCompressor(level=3, write_content_size=True).compressobj(size=nbytes)
        return b"".join(c.compress(ch) for ch in chunks) + c.flush()
    if codec == "gzip":
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        return b"".join(c.compress(ch) for ch in chunks) + c.flush()
    if codec == "bz2":
        c = bz2.BZ2Compressor(9)
        return b"".join(c.compress(ch) for ch in chunks) + c.flush()
    if codec == "lzma":
        filters = [{"id": lzma.FILTER_LZMA2, "preset": 1, "dict_size": max(4096, nbytes)}]
        c = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=filters)
        return b"".join(c.compress(ch) for ch in chunks) + c.flush()
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(b"\0" * nbytes, store_size=False)
    raise ValueError(codec)


def _zero_shape(codec: str, numel: int, shape: list[int] | None = None):
    def lie(rng, seeds):
        return _file(seeds, codec, [("huge", shape or [numel], 0, zeros(codec, (numel + 7) // 8))])

    return lie


def _tiny_payload_huge_shape(rng, seeds):
    codec = rng.choice(sorted(seeds))
    h, _, body = split(seeds[codec])
    h["tensors"][rng.randrange(len(h["tensors"]))].update(shape=rng.choice([[1 << 32], [1 << 16, 1 << 16],
                                                                           [1 << 30, 4]]), active=0)
    return pack(json.dumps(h).encode(), body)


def _many_tensors(rng, seeds):
    return _file(seeds, "raw", [(f"t{i}", [0], 0, b"") for i in range(rng.randint(16385, 30000))])


def _many_big_tensors(rng, seeds):
    codec = rng.choice(["zstd", "bz2", "gzip"])
    p = zeros(codec, 1 << 15)
    return _file(seeds, codec, [(f"t{i}", [1 << 18], 0, p) for i in range(rng.randint(600, 16000))])


def _expert_copies(rng, seeds):
    """Valid ans payloads repeated as ``expert<k>/<name>`` entries (each fits the backbone)."""
    h, _, body = split(seeds["ans"])
    out = []
    for k in range(rng.randint(20, 200)):
        for t in h["tensors"]:
            out.append((f"expert{k}/{t['name']}", t["shape"], t["active"],
                        body[t["offset"]:t["offset"] + t["length"]]))
    return _file(seeds, "ans", out)


def _header_stream(prefix: bytes, unit: bytes, count: int, suffix: bytes) -> bytes:
    step = unit * (MB // len(unit))
    n_steps, rest = divmod(count * len(unit), len(step))
    return pack_raw_header(_deflate([prefix] + [step] * n_steps + [step[:rest], suffix]), b"")


@functools.cache
def _list_bomb() -> bytes:  # 60 MB of "[]," from about 60 kB
    return _header_stream(b'{"tensors":[', b"[],", 20_000_000, b"[]]}")


@functools.cache
def _space_bomb() -> bytes:  # 80 MB of whitespace
    return _header_stream(b"", b" ", 80 * MB, b"{}")


@functools.cache
def _key_bomb(n: int) -> bytes:  # n metadata keys (2 million: a 5 MB file)
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    parts = [c.compress(b'{"metadata":{')]
    for start in range(0, n, 100_000):
        keys = range(start, min(n, start + 100_000))
        parts.append(c.compress(b"".join(b'"k%07d":"",' % i for i in keys)))
    parts += [c.compress(b'"z":""}}'), c.flush()]
    return pack_raw_header(b"".join(parts), b"")


def _list_bomb_within_ratio(rng, seeds):
    """Incompressible padding buys the largest inflated header the ratio allows; the rest is "[],"."""
    pad = rng.randbytes(48_000).hex()
    text = b'{"metadata":{"pad":"' + pad.encode() + b'"},"tensors":[' + b"[]," * 1_000_000 + b"[]]}"
    return pack(text, b"")


def _deep(rng, seeds):
    n = rng.choice([2_000, 100_000, 200_000])
    return pack(b"[" * n + b"]" * n, b"")


def _big_int(rng, seeds):
    digits = b"9" * rng.choice([21, 5000, 200_000])
    return pack(b'{"backbone":{"name":"x","sha256":"' + b"0" * 64 + b'"},"codec":"raw","tensors":[{"name":'
                b'"a","shape":[' + digits + b'],"active":0,"offset":0,"length":0,"crc32":0}],"extras":null,'
                b'"metadata":{}}', b"")


def _long_value(rng, seeds):
    return _file(seeds, "raw", [], {"v": rng.randbytes(rng.choice([600_000, 1_600_000])).hex()})


def _metadata_at_limits(rng, seeds):
    """1024 keys of 256 characters and values filling the 1 MiB budget: a valid file."""
    value = "v" * ((1 << 20) // 1024 - 256)
    return _file(seeds, "raw", [], {f"{i:0256d}": value for i in range(1024)})


def _dup_keys(rng, seeds):
    h = split(seeds["zstd"])[0]
    text = json.dumps(h)
    key = rng.choice(['"codec": ', '"metadata": ', '"backbone": '])
    i = text.index(key)
    return pack((text[:1] + text[i:text.index(",", i) + 1] + text[1:]).encode(), split(seeds["zstd"])[2])


def _overlap(rng, seeds):
    h, _, body = split(seeds[rng.choice(["zstd", "gzip", "ans"])])
    for t in h["tensors"]:
        t["offset"] = 0
    return pack(json.dumps(h).encode(), body)


@functools.cache
def _extras_frame(size: int, random_prefix: int) -> bytes:
    c = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    parts = [c.compress(random.Random(0).randbytes(random_prefix))]
    left = size - random_prefix
    while left:
        n = min(left, MB)
        parts.append(c.compress(b"\0" * n))
        left -= n
    return b"".join(parts) + c.flush()


def _extras(seeds, stored: bytes, size: int) -> bytes:
    h, _, body = split(seeds["raw"])
    base = h["extras"]["offset"]
    h["extras"].update(length=len(stored), crc32=zlib.crc32(stored), size=size)
    return pack(json.dumps(h).encode(), body[:base] + stored)


def _extras_bomb(rng, seeds):  # 128 MiB declared, within the 256x ratio, over the decode limit
    return _extras(seeds, _extras_frame(128 * MB, 600_000), 128 * MB)


def _extras_at_limit(rng, seeds):  # 64 MiB of junk that decompresses, then is not safetensors
    return _extras(seeds, _extras_frame(64 * MB, 300_000), 64 * MB)


def _extras_ratio_lie(rng, seeds):
    stored = _extras_frame(4 * MB, 16)
    return _extras(seeds, stored, 256 * len(stored) + 65537)


def _wrong_hash(rng, seeds):
    h, _, body = split(seeds[rng.choice(sorted(seeds))])
    h["backbone"]["sha256"] = f"{rng.getrandbits(256):064x}"
    return pack(json.dumps(h).encode(), body)


def _odd_text(rng, seeds):
    h, _, body = split(seeds["zstd"])
    choice = rng.randrange(6)
    if choice == 0:
        h["tensors"][0]["name"] = "\ud800" + h["tensors"][0]["name"]
    elif choice == 1:
        h["metadata"]["\udfff"] = "x"
    elif choice == 2:
        h["tensors"][0]["crc32"] = float("nan")
    elif choice == 3:
        h["tensors"][0]["shape"] = [float(s) for s in h["tensors"][0]["shape"]]
    elif choice == 4:
        return pack(b"\xef\xbb\xbf" + json.dumps(h).encode(), body)  # a BOM
    else:
        return pack(b"{}", b"")
    return pack(json.dumps(h).encode("utf-8", "surrogatepass"), body)


def _not_deflate(rng, seeds):
    return pack_raw_header(rng.randbytes(rng.randint(1, 4000)), b"")


def _ans_counts_lie(rng, seeds):
    h, _, body = split(seeds["ans"])
    t = h["tensors"][0]
    numel = 1
    for s in t["shape"]:
        numel *= s
    lie = rng.choice([bytes([0]) + bytes([0xFF] * 9 + [0x01]),  # layout 0: a count of 2**63
                      bytes([4]) + bytes([0x7F]) * 16,  # layout 0: 16 buckets of 127 ones
                      bytes([0x10]) + rng.randbytes(4 * rng.randint(1, 8))])  # layout 1: random words
    return _file(seeds, "ans", [(t["name"], t["shape"], rng.choice([0, numel // 2]), lie)])


LIES = {
    "zstd_2^31_zeros": _zero_shape("zstd", 1 << 31),
    "zstd_2^32_zeros": _zero_shape("zstd", 1 << 32, [1 << 16, 1 << 16]),
    "zstd_over_default_budget": _zero_shape("zstd", (1 << 27) + 8),
    "zstd_at_default_budget": _zero_shape("zstd", 1 << 27),
    "gzip_2^30_zeros": _zero_shape("gzip", 1 << 30),
    "bz2_2^31_zeros": _zero_shape("bz2", 1 << 31),
    "lzma_2^28_zeros": _zero_shape("lzma", 1 << 28),
    "lz4_2^29_zeros": _zero_shape("lz4", 1 << 29),
    "tiny_payload_huge_shape": _tiny_payload_huge_shape,
    "many_tensors": _many_tensors,
    "many_big_tensors": _many_big_tensors,
    "expert_copies": _expert_copies,
    "header_list_bomb_60MB": lambda rng, seeds: _list_bomb(),
    "header_space_bomb_80MB": lambda rng, seeds: _space_bomb(),
    "header_2M_keys": lambda rng, seeds: _key_bomb(2_000_000),
    "header_250k_keys": lambda rng, seeds: _key_bomb(250_000),
    "header_list_bomb_within_ratio": _list_bomb_within_ratio,
    "header_deep_nesting": _deep,
    "header_big_int": _big_int,
    "metadata_long_value": _long_value,
    "metadata_at_limits": _metadata_at_limits,
    "duplicate_keys": _dup_keys,
    "overlapping_offsets": _overlap,
    "extras_128MiB_bomb": _extras_bomb,
    "extras_64MiB_junk": _extras_at_limit,
    "extras_ratio_lie": _extras_ratio_lie,
    "wrong_backbone_hash": _wrong_hash,
    "odd_text": _odd_text,
    "header_not_deflate": _not_deflate,
    "ans_counts_lie": _ans_counts_lie,
}
HEAVY = {"zstd_2^31_zeros", "zstd_2^32_zeros", "zstd_at_default_budget", "gzip_2^30_zeros", "bz2_2^31_zeros",
         "lzma_2^28_zeros", "lz4_2^29_zeros", "header_list_bomb_60MB", "header_space_bomb_80MB",
         "header_2M_keys", "header_250k_keys", "extras_128MiB_bomb", "extras_64MiB_junk", "many_big_tensors",
         "expert_copies"}
