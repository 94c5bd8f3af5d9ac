"""Every rule of docs/format.md's validation list that needs the data section, broken alone:
payload and extras checksums, codec payloads of the wrong size or with trailing bytes, capped
decompression, the ans coder's counts, a mask that does not fit the backbone, a backbone whose
hash differs, bad extras, and the other documented errors of the loading path (maskpack.load).
Header rules: tests/test_validation_rules.py.
"""

import re
import tracemalloc

import numpy as np
import pytest
import torch
from mask_files import (
    file_blobs,
    fixed_masks,
    fixed_net,
    put_file,
    read_file,
    refused,
    replace_blob,
    rewrite_header,
    save_good,
    set_field,
    split_file,
)
from torch import nn

import maskpack
from maskpack.errors import BackboneMismatchError, CodecError, FormatError
from maskpack.storage import container
from maskpack.storage.codecs import get_codec

# ------------------------------------------------------------------ payloads (checked when read)


def _swap_bits(payload: bytes) -> bytes:
    """Move one set bit of the first byte to an unset position: same popcount, same padding."""
    b = payload[0]
    one = next(i for i in range(8) if b >> i & 1)
    zero = next(i for i in range(8) if not b >> i & 1)
    return bytes([b ^ (1 << one) ^ (1 << zero)]) + payload[1:]


def test_payload_checksum(tmp_path, good):
    header, blobs = file_blobs(good)
    # a changed payload with the old checksum: decodes to the same active count, so only the
    # checksum can tell
    bad = replace_blob(good, 0, _swap_bits(blobs[0]), crc=header["tensors"][0]["crc32"])
    mf = read_file(tmp_path, bad)  # read() parses the header only
    with refused(tmp_path, "checksum mismatch in tensor '0.weight': the file is corrupted"):
        mf.masks()
    with refused(tmp_path, "checksum mismatch in tensor '0.weight'"):
        mf.verify()


def test_extras_checksum(tmp_path, good):
    header, blobs = file_blobs(good)
    stored = blobs[-1]
    changed = stored[:-1] + bytes([stored[-1] ^ 0x01])
    bad = replace_blob(good, len(blobs) - 1, changed, crc=header["extras"]["crc32"])
    mf = read_file(tmp_path, bad)
    assert set(mf.masks()) == {"0.weight", "1.weight"}  # the masks are fine
    with refused(tmp_path, "checksum mismatch in extras: the file is corrupted"):
        mf.extras  # noqa: B018


def test_decoded_active_count_differs_from_the_header(tmp_path, good):
    mf = read_file(tmp_path, rewrite_header(good, set_field("tensors/0/active", 7)))
    with refused(tmp_path, "mask '0.weight' decodes to 8 active entries, the header says 7"):
        mf.masks()


def test_raw_payload_with_padding_bits_set(tmp_path, good):
    header, blobs = file_blobs(good)
    padded = blobs[0][:1] + bytes([blobs[0][1] | 0x80])  # bit 15 of a 12-bit mask
    mf = read_file(tmp_path, replace_blob(good, 0, padded))
    with pytest.raises(CodecError, match="packed mask has non-zero padding bits"):
        mf.masks()


def test_file_that_changes_size_after_it_was_read(tmp_path, good):
    for changed in (good + b"\x00", good[:-1]):
        mf = read_file(tmp_path, good)
        put_file(tmp_path, changed)
        with refused(tmp_path, "the file changed size while reading"):
            mf.masks()


def test_read_blob_checks_length_and_checksum(tmp_path, good):
    path = put_file(tmp_path, good)
    info = container.parse(path)
    assert container.read_blob(path, info, info.tensors[1], "t") == file_blobs(good)[1][1]
    wrong = container.Entry(info.tensors[1].offset, info.tensors[1].length, info.tensors[1].crc32 ^ 1)
    with refused(tmp_path, "checksum mismatch in t: the file is corrupted"):
        container.read_blob(path, info, wrong, "t")
    put_file(tmp_path, good[:-4])
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
BOMB_REFUSED = {"gzip": "more than the expected 13 bytes", "bz2": "more than the expected 13 bytes",
                "lzma": "more than the expected 13 bytes", "lz4": "lz4 payload does not decode",
                "snappy": "snappy payload declares 4194304 bytes, expected 13",
                "zstd": "zstd payload declares (4194304|-1) bytes, expected 13"}


@pytest.mark.parametrize("codec", sorted(COMPRESSORS))
def test_decompressors_never_inflate_past_the_expected_size(codec):
    import zstandard

    payloads = [COMPRESSORS[codec](b"\x00" * BOMB)]
    if codec == "zstd":  # a frame that does not declare its size
        payloads.append(zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * BOMB))
    for payload in payloads:
        tracemalloc.start()
        try:
            with pytest.raises(CodecError, match=BOMB_REFUSED[codec]):
                get_codec(codec).decode(payload, 100)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < BOMB // 4, f"{codec} allocated {peak} bytes for a 13-byte mask"


# -------------------------------------------------------------------------------------- ans


def _ans_file(tmp_path) -> bytes:
    return save_good(tmp_path, "ans", name="ans.mask")


def test_ans_bucket_count_larger_than_its_bucket(tmp_path):
    data = _ans_file(tmp_path)
    # one bucket (log2 B = 0) of 12 elements claiming 13 ones, no coded words
    mf = read_file(tmp_path, replace_blob(data, 0, bytes([0, 13])))
    with pytest.raises(CodecError, match="ans bucket 0 claims 13 ones but holds 12 elements"):
        mf.masks(fixed_net())


def test_ans_payload_size_does_not_bound_the_coded_entries(tmp_path):
    # The stack coder stores runs of its most probable symbol for free while its state is small:
    # keeping the first rows of a layer (every bucket's minority comes first) codes 1500 entries
    # in no words at all. Such files are valid and load.
    net = nn.Sequential(nn.Linear(100, 50, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.linspace(-1, 1, 5000).reshape(50, 100))
    mask = torch.zeros(50, 100, dtype=torch.bool)
    mask[:15] = True
    maskpack.save(tmp_path / "rows.mask", {"0.weight": mask}, net)
    mf = maskpack.read(tmp_path / "rows.mask")
    assert mf.tensors[0].active == 1500 and mf.tensors[0].length < 100
    assert torch.equal(mf.masks(net)["0.weight"], mask)
    from maskpack.masking import masked_weight

    expected = masked_weight(net[0].weight.detach(), mask.float())
    assert torch.equal(maskpack.load(tmp_path / "rows.mask", net).backbone[0].weight, expected)
    # and hostile counts cost no more than the bucket: 2^19 claimed ones from 4 bytes of words decode
    # to exactly 2^19 ones, or are refused
    absw = np.ones(1 << 20, dtype=np.float32)
    payload = bytes([0, 0x80, 0x80, 0x20]) + b"\x01\x00\x00\x00"
    try:
        out = get_codec("ans").decode(payload, 1 << 20, absw)
    except CodecError:
        return
    assert int(out.sum()) == 1 << 19


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
        mf = read_file(tmp_path, rewrite_header(data, set_field("tensors/0/shape", [4, 3])))
        with refused(tmp_path, re.escape("mask '0.weight' [4, 3] does not fit the backbone "
                                                        "([3, 4])")):
            mf.masks(fixed_net())
        mf = read_file(tmp_path, rewrite_header(data, set_field("tensors/1/name", "2.weight")))
        with refused(tmp_path, re.escape("mask '2.weight' [2, 3, 3, 3] does not fit the "
                                                        "backbone (missing)")):
            mf.masks(fixed_net())


def test_backbone_whose_hash_differs(tmp_path, good):
    other = fixed_net(shift=0.5)
    stored, actual = maskpack.backbone_hash(fixed_net()), maskpack.backbone_hash(other)
    path = put_file(tmp_path, good)
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
    mf = read_file(tmp_path, _ans_file(tmp_path))
    with refused(tmp_path, re.escape("codec 'ans' needs the backbone to decode masks: call "
                                                    "masks(load_backbone('Sequential'))")):
        mf.masks()


# ------------------------------------------------------------------------------------ extras


def test_extras_that_are_not_a_zstd_frame(tmp_path, good):
    bad = replace_blob(good, 2, b"\x00" * 16)
    with refused(tmp_path, "extras are not a zstd frame"):
        read_file(tmp_path, bad).extras  # noqa: B018


def test_extras_frame_size_disagrees_with_the_header(tmp_path, good):
    bad = rewrite_header(good, lambda h: h["extras"].update(size=h["extras"]["size"] + 4))
    size = split_file(good)[0]["extras"]["size"]
    with refused(tmp_path, f"extras frame declares {size} bytes, the header {size + 4}"):
        read_file(tmp_path, bad).extras  # noqa: B018


def test_extras_that_do_not_decompress(tmp_path, good):
    import zstandard

    header, blobs = file_blobs(good)
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"\x01" * 64)
    bad = replace_blob(good, 2, frame[:-3], crc=None)
    bad = rewrite_header(bad, set_field("extras/size", 64))
    with refused(tmp_path, "extras do not decompress"):
        read_file(tmp_path, bad).extras  # noqa: B018


def test_extras_declaring_an_absurd_expansion(tmp_path, good):
    from safetensors.torch import save as st_save

    # a valid safetensors blob (1 MiB of zeros) that compresses to a few hundred bytes: only
    # the expansion rule refuses it, before anything is decompressed
    blob = st_save({"head.bias": torch.zeros(1 << 18)})
    stored = container.encode_extras(blob)
    bad = rewrite_header(replace_blob(good, 2, stored), set_field("extras/size", len(blob)))
    with refused(tmp_path, f"extras declare {len(blob)} bytes from a {len(stored)}-byte blob: "
                                          "refusing"):
        read_file(tmp_path, bad)


def test_extras_expansion_limit_is_exact(tmp_path, good):
    length = split_file(good)[0]["extras"]["length"]
    limit = container.MAX_EXTRAS_EXPANSION * length + 65536
    at_limit = rewrite_header(good, set_field("extras/size", limit))
    assert read_file(tmp_path, at_limit).tensors  # a header-only check
    with refused(tmp_path, f"extras declare {limit + 1} bytes from a {length}-byte blob"):
        read_file(tmp_path, rewrite_header(good, set_field("extras/size", limit + 1)))


def test_extras_that_are_not_safetensors(tmp_path, good):
    junk = b"\x08" + b"\x00" * 40
    bad = rewrite_header(replace_blob(good, 2, container.encode_extras(junk, 4)),
                         lambda h: h["extras"].update(size=len(junk), planes=4))
    with refused(tmp_path, "extras are not a valid safetensors blob"):
        read_file(tmp_path, bad).extras  # noqa: B018


# ---------------------------------------------------------------------------- the loading path


def test_bad_mask_scale_metadata(tmp_path, good):
    for value, scale in (("true", True), ("FALSE", False), (" 1 ", True), ("0", False)):
        data = rewrite_header(good, set_field("metadata/mask.scale", value))
        assert read_file(tmp_path, data).scale is scale
    path = put_file(tmp_path, rewrite_header(good, set_field("metadata/mask.scale", "maybe")))
    with refused(tmp_path, "metadata 'mask.scale' must be 'true' or 'false', got 'maybe'"):
        maskpack.load(path, fixed_net())


def test_load_refuses_a_cascade_file(tmp_path, good):
    path = put_file(tmp_path, rewrite_header(good, set_field("metadata/cascade.format", "maskpack-cascade")))
    with refused(tmp_path, "holds a cascade .* load it with maskpack.load_cascade"):
        maskpack.load(path, fixed_net())


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
    maskpack.save(tmp_path / "t.mask", fixed_masks(), fixed_net(), extras=extras)
    with pytest.raises(FormatError, match=re.escape(match)):
        maskpack.load(tmp_path / "t.mask", fixed_net())


def test_load_with_extras_over_the_backbone(tmp_path):
    extras = {"backbone.0.weight": torch.full((3, 4), 2.0), "head.weight": torch.ones(5, 2)}
    maskpack.save(tmp_path / "t.mask", fixed_masks(), fixed_net(), extras=extras,
                  metadata={"mask.scale": "false"})
    model = maskpack.load(tmp_path / "t.mask", fixed_net())
    # extras are applied after the masks: the stored tensor wins, the masked one is baked
    assert torch.equal(model.backbone[0].weight, torch.full((3, 4), 2.0))
    assert torch.equal(model.backbone[1].weight, fixed_net()[1].weight * fixed_masks()["1.weight"])
    assert model.head.weight.shape == (5, 2) and model.head.bias is None
    assert not model.training and not any(p.requires_grad for p in model.parameters())
