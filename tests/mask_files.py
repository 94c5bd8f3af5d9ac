"""Building hostile ``.mask`` files for tests: a small valid file over fixed weights, and helpers
that rewrite its header or blobs while keeping every checksum, offset and length consistent, so a
test can break exactly one rule of docs/format.md "Validation"."""

import contextlib
import json
import struct
import zlib

import pytest
import torch
from torch import nn

import maskpack
from maskpack.errors import FormatError
from maskpack.storage.container import MAGIC, VERSION


def fixed_net(shift: float = 0.0) -> nn.Module:
    """Weights that are exactly representable: the same hash everywhere."""
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Conv2d(3, 2, 3, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(((torch.arange(p.numel()) % 7 - 3) * 0.25 + shift).reshape(p.shape))
    return net


def fixed_masks() -> dict[str, torch.Tensor]:
    # 0.weight: 12 bits, 8 active, a 2-byte raw payload; 1.weight: 54 bits, 43 active, 7 bytes
    return {"0.weight": torch.arange(12).reshape(3, 4) % 3 != 0,
            "1.weight": torch.arange(54).reshape(2, 3, 3, 3) % 5 != 1}


def save_good(tmp_path, codec: str = "raw", name: str = "good.mask", **kw) -> bytes:
    kw.setdefault("extras", {"head.bias": torch.arange(3.0)})
    kw.setdefault("metadata", {"k": "v"})
    maskpack.save(tmp_path / name, fixed_masks(), fixed_net(), codec=codec, **kw)
    return (tmp_path / name).read_bytes()


def split_file(data: bytes) -> tuple[dict, bytes]:
    """The header as a dict and the data section."""
    hlen = struct.unpack("<I", data[10:14])[0]
    return json.loads(zlib.decompress(data[18:18 + hlen], -15)), data[18 + hlen:]


def deflate(text: bytes, level: int = 9) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(text) + c.flush()


def pack_file(hdr: bytes, section: bytes, *, version: int = VERSION, crc: int | None = None) -> bytes:
    """A file around an already compressed header (its crc32 is right unless ``crc`` is given)."""
    crc = zlib.crc32(hdr) if crc is None else crc
    return struct.pack("<8sHII", MAGIC, version, len(hdr), crc) + hdr + section


def rewrite_header(data: bytes, mutate) -> bytes:
    """Re-pack a file after ``mutate(header)``, with a valid header checksum."""
    header, section = split_file(data)
    mutate(header)
    return pack_file(deflate(json.dumps(header).encode()), section)


def file_blobs(data: bytes) -> tuple[dict, list[bytes]]:
    header, section = split_file(data)
    entries = header["tensors"] + ([header["extras"]] if header["extras"] else [])
    return header, [section[e["offset"]:e["offset"] + e["length"]] for e in entries]


def replace_blob(data: bytes, index: int, blob: bytes, crc: int | None = None) -> bytes:
    """Put ``blob`` in place of entry ``index`` (tensors, then extras); offsets, lengths and
    checksums are recomputed so the file tiles exactly (``crc``: store this checksum instead)."""
    header, blobs = file_blobs(data)
    blobs[index] = blob
    entries = header["tensors"] + ([header["extras"]] if header["extras"] else [])
    pos = 0
    for e, b in zip(entries, blobs, strict=True):
        e.update(offset=pos, length=len(b), crc32=zlib.crc32(b))
        pos += len(b)
    if crc is not None:
        entries[index]["crc32"] = crc
    return pack_file(deflate(json.dumps(header).encode()), b"".join(blobs))


@contextlib.contextmanager
def refused(tmp_path, match: str, err: type[Exception] = FormatError):
    """``pytest.raises(err, match=match)`` whose message must also start with the file's path."""
    with pytest.raises(err, match=match) as info:
        yield info
    assert str(info.value).startswith(str(tmp_path)), f"the message does not name the file: {info.value}"


def put_file(tmp_path, data: bytes, name: str = "bad.mask"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_file(tmp_path, data: bytes) -> maskpack.io.MaskFile:
    return maskpack.read(put_file(tmp_path, data))


def load_all(tmp_path, data: bytes, backbone=None) -> dict:
    mf = read_file(tmp_path, data)
    masks = mf.masks(fixed_net() if backbone is None else backbone)
    return {"masks": masks, "extras": mf.extras}


def set_field(path: str, value):
    """A mutation that sets ``header[a][b]...`` (path ``a/b``; list indices as numbers)."""
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]

    def mutate(h):
        for p in parents:
            h = h[p]
        h[leaf] = value
    return mutate


def pop_field(path: str):
    """A mutation that deletes ``header[a][b]...`` (path ``a/b``)."""
    *parents, leaf = [int(p) if p.isdigit() else p for p in path.split("/")]

    def mutate(h):
        for p in parents:
            h = h[p]
        del h[leaf]
    return mutate
