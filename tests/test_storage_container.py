"""The .mask container: golden bytes, and every hostile-input case gets our specific error."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import maskpack
from maskpack.errors import CodecError, FormatError, MaskpackError
from maskpack.storage import container


def fixed_net() -> nn.Module:
    """Exactly representable weights: the same hash on every machine and torch version."""
    net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Conv2d(3, 2, 3, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(((torch.arange(p.numel()) % 7 - 3) * 0.25).reshape(p.shape))
    return net


def fixed_masks() -> dict[str, torch.Tensor]:
    return {"0.weight": torch.arange(12).reshape(3, 4) % 3 != 0,
            "1.weight": torch.arange(54).reshape(2, 3, 3, 3) % 5 != 1}


def _save(path, codec="raw", **kw):
    maskpack.save(path, fixed_masks(), fixed_net(), codec=codec, **kw)
    return path.read_bytes()


# Pinned bytes of format version 2 (what the writer writes). If these change, the format changed:
# bump VERSION and keep files of the old version loading (tests/test_format_v1.py).
GOLDEN_RAW = (
    "894d41534b0d0a1a0200e000000003dec9c065d0cd6ac3300c07f077d1d98cd88abff21a3b961d645b694253674bdc76"
    "50f2ee7529a483e1832d817e7fe13b048aa7306786ee0e99cef5864ffeb9702e234d20601d486953bbbdc240419b9012"
    "b1f2e8d1a4467b1b5aa33938a69ea525eb255a257bef75b4c1d91095948a7572b0098873e258ad856e952e9cd77959a1"
    "3becd1cdc78dc7e3505ec1dfb57540d17e09a058c66b2d9d80b9ef572ed0350226cec73240a72abd4454f5854eba4662"
    "db6c6257e57f55097c9e3f728b6f5abd69bbd368b4914669dcea14ff9685eaeaf9324d02ce5c2851a1e7279e6ae015b6"
    "ed01b60dbdf7de7befbd37")
GOLDEN_ANS = (
    "894d41534b0d0a1a0200dc000000da4ca37f65d0c16ac3300c00d07fd1d98cd88e2d3bbfb163d941b6e5262c75b6c45d"
    "0b25ff3e8f4133183a0809f424f48040f13d2c85617840a14bcbf0ca9f572e75a219046c2329635b372b1d28181b5222"
    "565e7b6d53673c86de1a0e8e29b344422f352a99bd371183c31095948a4d72b00b884be2d82c2a5ba32b976d5937184e"
    "cfd5ddcb8da7f3587f177fb4d6498bfe4d00c53a7db5d2095872deb8c2d00998b99ceb08836ff41ab582419abe4389d2"
    "ea5d3c55f95f5542ffc41fb9d707ed0f5aeac3eed0a3730a716f737caf2bb5e3cb759e055cb852a24aed8dfbfe0d10cd"
    "9ad0cd01000000103a48e3b8b124c6a406000000")


def test_golden_bytes_raw(tmp_path):
    data = _save(tmp_path / "g.mask", "raw", metadata={"k": "v"})
    assert data[:18].hex() == "894d41534b0d0a1a0200" + data[10:18].hex()
    assert data.hex() == GOLDEN_RAW


def test_golden_bytes_ans(tmp_path):
    assert _save(tmp_path / "g.mask", "ans").hex() == GOLDEN_ANS


def test_golden_header_content(tmp_path):
    data = _save(tmp_path / "g.mask", "raw", metadata={"k": "v"})
    magic, version, hlen, hcrc = struct.unpack("<8sHII", data[:18])
    assert (magic, version) == (b"\x89MASK\r\n\x1a", 2)
    header = json.loads(zlib.decompress(data[18:18 + hlen], -15))
    assert header["backbone"] == {"name": "Sequential", "sha256": maskpack.backbone_hash(fixed_net())}
    assert header["codec"] == "raw" and header["extras"] is None and header["metadata"] == {"k": "v"}
    t0, t1 = header["tensors"]
    assert t0 == {"name": "0.weight", "shape": [3, 4], "active": 8, "offset": 0, "length": 2,
                  "crc32": zlib.crc32(data[18 + hlen:18 + hlen + 2])}
    assert t1["offset"] == 2 and t1["length"] == 7
    # raw payload: np.packbits little bit order of the C-order flattened mask
    assert data[18 + hlen:18 + hlen + 2] == np.packbits(fixed_masks()["0.weight"].numpy().ravel(),
                                                        bitorder="little").tobytes()


def test_same_inputs_same_bytes(tmp_path):
    a = _save(tmp_path / "a.mask", "ans", extras={"head.weight": torch.ones(2, 2)}, metadata={"x": "1"})
    masks = dict(reversed(list(fixed_masks().items())))  # dict order does not matter
    maskpack.save(tmp_path / "b.mask", masks, fixed_net(), codec="ans",
                  extras={"head.weight": torch.ones(2, 2)}, metadata={"x": "1"})
    assert (tmp_path / "b.mask").read_bytes() == a


# ------------------------------------------------------------------------------ hostile files


def _rewrite(src: bytes, mutate) -> bytes:
    """Re-pack a file after mutating its header dict (with a valid header checksum)."""
    hlen = struct.unpack("<I", src[10:14])[0]
    header = json.loads(zlib.decompress(src[18:18 + hlen], -15))
    mutate(header)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(json.dumps(header).encode()) + c.flush()
    preamble = struct.pack("<8sHII", src[:8], container.VERSION, len(hdr), zlib.crc32(hdr))
    return preamble + hdr + src[18 + hlen:]


@pytest.fixture
def good(tmp_path):
    return _save(tmp_path / "good.mask", "raw", extras={"head.bias": torch.arange(3.0)})


def _open(tmp_path, data):
    p = tmp_path / "bad.mask"
    p.write_bytes(data)
    mf = maskpack.read(p)
    mf.masks()
    return mf.extras


def test_truncated(tmp_path, good):
    for cut in (0, 5, 17, 18, 30, len(good) - 1):
        with pytest.raises(FormatError, match="truncated|past the end|checksum"):
            _open(tmp_path, good[:cut])


def test_header_length_past_end(tmp_path, good):
    with pytest.raises(FormatError, match="past the end"):
        _open(tmp_path, good[:10] + struct.pack("<I", 1 << 20) + good[14:])


def test_bad_magic_and_version(tmp_path, good):
    with pytest.raises(FormatError, match="bad magic"):
        _open(tmp_path, b"PK\x03\x04" + good[4:])
    with pytest.raises(FormatError, match="version 3"):
        _open(tmp_path, good[:8] + b"\x03\x00" + good[10:])


def test_unknown_codec(tmp_path, good):
    with pytest.raises(CodecError, match="unknown codec 'brotli'"):
        _open(tmp_path, _rewrite(good, lambda h: h.update(codec="brotli")))


def test_overlapping_offsets(tmp_path, good):
    with pytest.raises(FormatError, match="gaps or overlaps"):
        _open(tmp_path, _rewrite(good, lambda h: h["tensors"][1].update(offset=0)))


def test_offset_out_of_range(tmp_path, good):
    with pytest.raises(FormatError, match="extras start"):
        _open(tmp_path, _rewrite(good, lambda h: h["extras"].update(offset=10**9)))
    with pytest.raises(FormatError, match="truncated file or trailing"):
        _open(tmp_path, _rewrite(good, lambda h: h["extras"].update(length=10**9)))


def test_trailing_garbage(tmp_path, good):
    with pytest.raises(FormatError, match="trailing garbage"):
        _open(tmp_path, good + b"\x00")


def test_shape_payload_disagree(tmp_path, good):
    with pytest.raises(FormatError, match="raw payload"):
        _open(tmp_path, _rewrite(good, lambda h: h["tensors"][0].update(shape=[3, 40])))


def test_shape_payload_disagree_compressed(tmp_path):
    data = _save(tmp_path / "z.mask", "zstd")
    with pytest.raises(CodecError, match="declares"):
        _open(tmp_path, _rewrite(data, lambda h: h["tensors"][0].update(shape=[3, 40], active=0)))


def test_active_count_disagree(tmp_path, good):
    with pytest.raises(FormatError, match="active entries"):
        _open(tmp_path, _rewrite(good, lambda h: h["tensors"][0].update(active=1)))


def test_absurd_sizes(tmp_path, good):
    with pytest.raises(FormatError, match="limit"):
        _open(tmp_path, _rewrite(good, lambda h: h["tensors"][0].update(shape=[1 << 30, 1 << 30])))
    with pytest.raises(FormatError, match="shape"):
        _open(tmp_path, _rewrite(good, lambda h: h["tensors"][0].update(shape=[1] * 100)))
    with pytest.raises(FormatError, match="past the end"):
        _open(tmp_path, good[:10] + struct.pack("<I", 0xFFFFFFFF) + good[14:])


def test_header_bomb(tmp_path, good):
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(b" " * (80 << 20)) + c.flush()  # 80 MB of JSON whitespace in ~80 kB
    bomb = struct.pack("<8sHII", good[:8], 1, len(hdr), zlib.crc32(hdr)) + hdr
    with pytest.raises(FormatError, match="oversized"):
        _open(tmp_path, bomb)


@pytest.mark.parametrize("mutate,match", [
    (lambda h: h.pop("metadata"), r"header keys must be \['backbone', 'codec', 'extras', 'metadata', "),
    (lambda h: h.update(metadata={"a": 1}), "header 'metadata' must map strings to strings"),
    (lambda h: h["backbone"].update(sha256="xyz"), "header 'backbone' must be {name: str, sha256: 64 "),
    (lambda h: h["tensors"][0].update(active=-1), r"tensor '0.weight' active count must be an integer in "
                                                  r"0\.\.12, got -1"),
    (lambda h: h["tensors"][0].update(name=""), "tensor entry 0 has no valid name"),
    (lambda h: h["tensors"].append(h["tensors"][0]), "tensor '0.weight' appears twice"),
    (lambda h: h["tensors"][0].update(crc32="7"), "tensor '0.weight' crc32 must be an integer"),
    (lambda h: h.update(tensors={}), "header 'tensors' must be a list"),
])
def test_bad_header_fields(tmp_path, good, mutate, match):
    with pytest.raises(FormatError, match=match):
        _open(tmp_path, _rewrite(good, mutate))


def test_not_json(tmp_path, good):
    for text in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        hdr = zlib.compress(text)[2:-4]  # raw DEFLATE: strip zlib's header and adler32
        with pytest.raises(FormatError, match="JSON"):
            _open(tmp_path, struct.pack("<8sHII", good[:8], 1, len(hdr), zlib.crc32(hdr)) + hdr)


@pytest.mark.parametrize("codec", ["raw", "ans", "zstd"])
def test_every_flipped_byte_is_caught(tmp_path, codec):
    data = _save(tmp_path / "f.mask", codec, extras={"head.bias": torch.arange(3.0)})
    net = fixed_net()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        p = tmp_path / "bad.mask"
        p.write_bytes(bytes(bad))
        with pytest.raises(MaskpackError):
            mf = maskpack.read(p)
            mf.masks(net)
            mf.extras  # noqa: B018


def _replace_extras(tmp_path, good, stored: bytes, size: int) -> bytes:
    hlen = struct.unpack("<I", good[10:14])[0]
    mf = maskpack.read(tmp_path / "good.mask")
    data = good[:18 + hlen + mf._info.extras.offset] + stored
    return _rewrite(data, lambda h: h["extras"].update(crc32=zlib.crc32(stored), length=len(stored),
                                                      size=size, planes=4))


def test_extras_blob_must_be_safetensors(tmp_path, good):
    junk = b"\x08" + b"\x00" * 40
    data = _replace_extras(tmp_path, good, container.encode_extras(junk), len(junk))
    with pytest.raises(FormatError, match="safetensors"):
        _open(tmp_path, data)


def test_extras_that_are_not_zstd_or_disagree_with_their_size(tmp_path, good):
    with pytest.raises(FormatError, match="not a zstd frame"):
        _open(tmp_path, _replace_extras(tmp_path, good, b"\x00" * 32, 40))
    blob = b"\x01" * 40
    with pytest.raises(FormatError, match="declares 40 bytes, the header 44"):
        _open(tmp_path, _replace_extras(tmp_path, good, container.encode_extras(blob), 41))


def test_extras_bomb_is_refused_before_decompressing(tmp_path, good):
    zeros = container.encode_extras(b"\x00" * (1 << 24))  # 16 MiB of zeros: a tiny frame
    with pytest.raises(FormatError, match="refusing"):
        _open(tmp_path, _replace_extras(tmp_path, good, zeros, 1 << 24))


def test_extras_are_byte_shuffled_and_compressed(tmp_path):
    blob = np.linspace(0.5, 1.5, 4096, dtype=np.float32).tobytes() + b"xyz"
    stored = container.encode_extras(blob)
    assert len(stored) < len(blob) // 2
    entry = container.ExtrasEntry(0, len(stored), zlib.crc32(stored), len(blob))
    assert container.decode_extras(stored, entry, "x", 1 << 20) == blob


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "set"]), st.integers(0, 10**6),
                              st.integers(0, 255)), min_size=1, max_size=4))
def test_fuzz_changed_files_are_refused_with_our_errors(tmp_path, ops):
    # Every byte of a file is covered by a check (magic, version, lengths, crc32 of the header and
    # of every blob), so a file that differs from the original is refused with a MaskpackError,
    # never another exception; one that is accepted is byte-identical and decodes to the same.
    net = fixed_net()
    for codec in ("ans", "gzip"):
        seed = FUZZ_SEEDS[codec]
        data = bytearray(seed)
        for op, pos, val in ops:
            pos %= max(len(data), 1)
            if op == "flip" and data:
                data[pos] ^= val or 1
            elif op == "cut":
                del data[pos:]
            elif op == "insert":
                data[pos:pos] = bytes([val])
            elif data:
                data[pos] = val
        p = tmp_path / "fuzz.mask"
        p.write_bytes(bytes(data))
        try:
            mf = maskpack.read(p)
            masks = mf.masks(net)
            extras = mf.extras
        except MaskpackError:
            assert bytes(data) != seed, "the unchanged file was refused"
            continue
        assert bytes(data) == seed, f"a changed file was accepted: {ops}"
        assert all(torch.equal(masks[k], v) for k, v in fixed_masks().items())
        assert torch.equal(extras["head.weight"], torch.ones(2, 3))


def _seed(codec: str) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return _save(Path(d) / "s.mask", codec, extras={"head.weight": torch.ones(2, 3)}, metadata={"a": "b"})


FUZZ_SEEDS = {c: _seed(c) for c in ("ans", "gzip")}


def test_container_parse_never_reads_payloads(tmp_path, good):
    # read() validates the header only: a corrupted payload is found when masks are asked for.
    hlen = struct.unpack("<I", good[10:14])[0]
    bad = bytearray(good)
    bad[18 + hlen] ^= 1
    (tmp_path / "lazy.mask").write_bytes(bytes(bad))
    mf = maskpack.read(tmp_path / "lazy.mask")
    with pytest.raises(FormatError, match="checksum mismatch in tensor '0.weight'"):
        mf.masks()


def test_build_refuses_bad_entries():
    with pytest.raises(FormatError, match=r"<new file>: tensor .a. has shape \[8\] \(8 bits\) but a 2-byte"):
        container.build(backbone_name="x", backbone_hash="0" * 64, codec="raw",
                        tensors=[("a", (8,), 1, b"\x01\x02")], extras=None, metadata={})


def test_atomic_write_uses_a_hidden_temp_file_next_to_the_destination(tmp_path, monkeypatch):
    import os

    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((os.fspath(src), os.fspath(dst), open(src, "rb").read()))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    container.write_atomic(tmp_path / "out.mask", b"payload")
    (src, dst, data), = seen
    assert os.path.dirname(src) == str(tmp_path) and dst == str(tmp_path / "out.mask")
    name = os.path.basename(src)
    assert name.startswith(".") and "maskpack-" in name and name.endswith(".tmp") and data == b"payload"
    assert os.listdir(tmp_path) == ["out.mask"] and (tmp_path / "out.mask").read_bytes() == b"payload"


def test_extras_encoding_follows_the_format():
    import zstandard

    blob = np.random.default_rng(0).standard_normal(4096).astype("<f4").tobytes() + b"\x07"  # padded by 3
    stored = container.encode_extras(blob)
    padded = blob + b"\x00" * 3
    planes = b"".join(padded[k::4] for k in range(4))
    assert stored == zstandard.ZstdCompressor(level=19, write_content_size=True,
                                              write_checksum=False).compress(planes)
    entry = container.ExtrasEntry(0, len(stored), zlib.crc32(stored), len(blob))
    assert container.decode_extras(stored, entry, "x", 1 << 20) == blob
    with pytest.raises(FormatError, match="x: extras are not a zstd frame"):
        container.decode_extras(b"\x00" * 8, entry, "x", 1 << 20)
