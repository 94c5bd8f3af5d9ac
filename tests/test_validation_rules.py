"""Every rule of docs/format.md's validation list that the header decides, broken alone: the
preamble, the header (compression, JSON, every field and limit) and the tiling of the data section.
Payload, codec, backbone and extras rules: tests/test_validation_rules_data.py.

Each hostile file differs from a valid one in exactly one rule: the earlier checks pass (valid
checksums, offsets that tile the data section, sizes that agree), so removing that one check
from the reader makes its test fail. Boundary files (8 dimensions, 2^32 elements, a
1024-character name ...) must still be accepted, so an off-by-one in a limit fails too. Messages
are matched, and word for word at the end.
"""

import json
import re
import struct
import zlib

import pytest
import torch
from mask_files import (
    deflate,
    file_blobs,
    fixed_masks,
    fixed_net,
    load_all,
    pack_file,
    pop_field,
    put_file,
    read_file,
    refused,
    rewrite_header,
    save_good,
    set_field,
    split_file,
)
from torch import nn

import maskpack
from maskpack.errors import CodecError, FormatError
from maskpack.storage import container


def test_the_valid_file_passes_every_stage(tmp_path, good, good_zstd):
    for data in (good, good_zstd):
        got = load_all(tmp_path, data)
        assert all(torch.equal(got["masks"][k], v) for k, v in fixed_masks().items())
        assert torch.equal(got["extras"]["head.bias"], torch.arange(3.0))
    assert isinstance(maskpack.load(put_file(tmp_path, good), fixed_net()), nn.Module)


# ----------------------------------------------------------------------------------- preamble


def test_wrong_magic(tmp_path, good):
    for magic in (b"\x89MASX\r\n\x1a", b"\x89MASK\n\x1a\x00"):  # a text-mode transfer rewrites \r\n
        with refused(tmp_path, r"not a \.mask file \(bad magic bytes\)"):
            read_file(tmp_path, magic + good[8:])


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_unsupported_version(tmp_path, good, version):
    with refused(tmp_path, f"unsupported .mask format version {version}; this maskpack "
                                          "reads versions 1 and 2: upgrade maskpack"):
        read_file(tmp_path, good[:8] + struct.pack("<H", version) + good[10:])


@pytest.mark.parametrize("cut", [0, 8, 17])
def test_file_shorter_than_the_preamble(tmp_path, good, cut):
    with refused(tmp_path, rf"file is truncated \({cut} bytes\)"):
        read_file(tmp_path, good[:cut])


def test_header_length_past_the_end(tmp_path, good):
    hlen = struct.unpack("<I", good[10:14])[0]
    cut = good[:18 + hlen - 1]  # the header's last byte is missing
    with refused(tmp_path, f"header length {hlen} runs past the end of the {len(cut)}-byte"):
        read_file(tmp_path, cut)


def _padded_header(good: bytes, target: int) -> bytes:
    """A stored (level 0) DEFLATE header of exactly ``target`` bytes: the valid JSON plus spaces."""
    text = json.dumps(split_file(good)[0]).encode()
    pad = target - len(text)
    for _ in range(8):
        hdr = deflate(text + b" " * pad, level=0)
        if len(hdr) == target:
            return hdr
        pad -= len(hdr) - target
    raise AssertionError("could not size the header")


def test_header_length_over_the_limit(tmp_path, good, monkeypatch):
    # A valid header, only longer than the cap (lowered here so the files stay small): it would
    # parse if the cap were gone. A header of exactly the cap is accepted.
    monkeypatch.setattr(container, "MAX_HEADER", 4096)
    section = split_file(good)[1]
    assert read_file(tmp_path, pack_file(_padded_header(good, 4096), section)).codec == "raw"
    with refused(tmp_path, r"header length 4097 is over the limit 4096 \(corrupted"):
        read_file(tmp_path, pack_file(_padded_header(good, 4097), section))


def test_header_checksum_mismatch(tmp_path, good):
    crc = struct.unpack("<I", good[14:18])[0]
    with refused(tmp_path, "header checksum mismatch: the file is corrupted"):
        read_file(tmp_path, good[:14] + struct.pack("<I", crc ^ 1) + good[18:])


# ------------------------------------------------------------------------------------- header


def test_header_that_does_not_inflate(tmp_path, good):
    with refused(tmp_path, "header does not decompress"):
        read_file(tmp_path, pack_file(b"\xff\xff\xff\xff", split_file(good)[1]))


def test_header_whose_deflate_stream_does_not_end(tmp_path, good):
    header, section = split_file(good)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    hdr = c.compress(json.dumps(header).encode()) + c.flush(zlib.Z_SYNC_FLUSH)  # all bytes, no end
    with refused(tmp_path, "header is truncated"):
        read_file(tmp_path, pack_file(hdr, section))


def test_header_followed_by_garbage(tmp_path, good):
    header, section = split_file(good)
    with refused(tmp_path, "header is .*followed by garbage"):
        read_file(tmp_path, pack_file(deflate(json.dumps(header).encode()) + b"\x00junk", section))


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000],
                         ids=["syntax", "utf8", "nesting"])
def test_header_that_is_not_json(tmp_path, good, text):
    with refused(tmp_path, "header is not valid JSON"):
        read_file(tmp_path, pack_file(deflate(text), split_file(good)[1]))


@pytest.mark.parametrize("text", [b"[1, 2]", b'"backbone"', b"7", b"null"])
def test_header_that_is_not_an_object(tmp_path, good, text):
    with refused(tmp_path, "header is not a JSON object"):
        read_file(tmp_path, pack_file(deflate(text), split_file(good)[1]))


KEYS = "['backbone', 'codec', 'extras', 'metadata', 'tensors']"
BACKBONE = "header 'backbone' must be {name: str, sha256: 64 lowercase hex digits}"
TENSOR_KEYS = "['active', 'crc32', 'length', 'name', 'offset', 'shape']"
EXTRAS_KEYS = "['crc32', 'length', 'offset', 'planes', 'size']"  # format version 2
T0 = "tensor '0.weight'"
OFFSET = f"{T0} offset must be an integer in 0..{1 << 62}"
LENGTH = f"{T0} length must be an integer in 0..{1 << 62}"
CRC = f"{T0} crc32 must be an integer in 0..{0xFFFFFFFF}"
DIM = f"{T0} shape must be an integer in 0..{1 << 32}"
NDIM = f"{T0} shape must be a list of at most 8 sizes"
ACTIVE = f"{T0} active count must be an integer in 0..12"
SIZE = f"extras size must be an integer in 0..{1 << 34}"
EXTRAS_OFFSET = f"extras offset must be an integer in 0..{1 << 62}"
META = "header 'metadata' must map strings to strings"


HEADER_CASES = [
    ("missing key", pop_field("metadata"), f"header keys must be {KEYS}, got "
                                      "['backbone', 'codec', 'extras', 'tensors']"),
    ("extra key", set_field("note", "x"), f"header keys must be {KEYS}, got "
                                     "['backbone', 'codec', 'extras', 'metadata', 'note', 'tensors']"),
    ("backbone not an object", set_field("backbone", "efficientnet_lite0"), BACKBONE),
    ("backbone extra key", set_field("backbone/url", "x"), BACKBONE),
    ("backbone missing name", pop_field("backbone/name"), BACKBONE),
    ("backbone name not str", set_field("backbone/name", 5), BACKBONE),
    ("sha256 not str", set_field("backbone/sha256", 5), BACKBONE),
    ("sha256 uppercase", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"].upper()), BACKBONE),
    ("sha256 63 digits", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"][1:]), BACKBONE),
    ("sha256 65 digits", lambda h: h["backbone"].update(sha256=h["backbone"]["sha256"] + "0"), BACKBONE),
    ("sha256 not hex", set_field("backbone/sha256", "g" * 64), BACKBONE),
    ("codec not str", set_field("codec", 5), "header 'codec' must be a string"),
    ("codec null", set_field("codec", None), "header 'codec' must be a string"),
    ("metadata not object", set_field("metadata", ["k", "v"]), META),
    ("metadata number", set_field("metadata/k", 1), META),
    ("metadata null", set_field("metadata/k", None), META),
    ("tensors not list", set_field("tensors", {}), "header 'tensors' must be a list"),
    ("entry not object", set_field("tensors/0", ["0.weight"]), "tensor entry 0 is not an object"),
    ("name empty", set_field("tensors/0/name", ""), "tensor entry 0 has no valid name"),
    ("name not str", set_field("tensors/1/name", 7), "tensor entry 1 has no valid name"),
    ("name missing", pop_field("tensors/0/name"), "tensor entry 0 has no valid name"),
    ("name too long", set_field("tensors/0/name", "x" * 1025), "tensor entry 0 has no valid name"),
    ("entry extra key", set_field("tensors/0/note", 1), f"{T0} must be an object with keys {TENSOR_KEYS}"),
    ("entry missing key", pop_field("tensors/0/crc32"), f"{T0} must be an object with keys {TENSOR_KEYS}"),
    ("offset string", set_field("tensors/0/offset", "0"), f"{OFFSET}, got '0'"),
    ("offset bool", set_field("tensors/0/offset", False), f"{OFFSET}, got False"),
    ("offset negative", set_field("tensors/0/offset", -1), f"{OFFSET}, got -1"),
    ("offset huge", set_field("tensors/0/offset", (1 << 62) + 1), OFFSET),
    ("length null", set_field("tensors/0/length", None), f"{LENGTH}, got None"),
    ("length string", set_field("tensors/0/length", "2"), f"{LENGTH}, got '2'"),
    ("crc32 negative", set_field("tensors/0/crc32", -1), f"{CRC}, got -1"),
    ("crc32 over 32 bits", lambda h: h["tensors"][0].update(crc32=h["tensors"][0]["crc32"] + (1 << 32)),
     CRC),
    ("crc32 list", set_field("tensors/0/crc32", [1]), CRC),
    ("shape not list", set_field("tensors/0/shape", "3x4"), NDIM),
    ("shape 9 dims", set_field("tensors/0/shape", [1] * 7 + [3, 4]), NDIM),
    ("shape bool", set_field("tensors/0/shape", [3, True]), f"{DIM}, got True"),
    ("shape negative", set_field("tensors/0/shape", [-3, -4]), f"{DIM}, got -3"),
    ("active negative", set_field("tensors/0/active", -1), f"{ACTIVE}, got -1"),
    ("active over numel", set_field("tensors/0/active", 13), f"{ACTIVE}, got 13"),
    ("active string", set_field("tensors/0/active", "8"), f"{ACTIVE}, got '8'"),
    ("extras not object", set_field("extras", [1]), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras extra key", set_field("extras/note", 1), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras missing size", pop_field("extras/size"), f"extras must be an object with keys {EXTRAS_KEYS}"),
    ("extras size negative", set_field("extras/size", -1), f"{SIZE}, got -1"),
    ("extras size bool", set_field("extras/size", True), SIZE),
    ("extras offset null", set_field("extras/offset", None), EXTRAS_OFFSET),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_header_field(tmp_path, good, mutate, match):
    with refused(tmp_path, re.escape(match)):
        read_file(tmp_path, rewrite_header(good, mutate))


def test_unknown_codec_is_a_codec_error(tmp_path, good):
    with pytest.raises(CodecError, match="unknown codec 'brotli': use one of raw, gzip"):
        read_file(tmp_path, rewrite_header(good, set_field("codec", "brotli")))


@pytest.mark.parametrize("mutate", [
    set_field("tensors/0/name", "x" * 1024),  # the longest name allowed
    set_field("tensors/0/shape", [1] * 6 + [3, 4]),  # 8 dimensions
    set_field("tensors/0/active", 12), set_field("tensors/0/active", 0),  # the ends of the active range
    set_field("tensors/0/crc32", 0xFFFFFFFF), set_field("tensors/0/crc32", 0),  # wrong: found when read
    set_field("metadata", {}),
], ids=["name 1024", "8 dims", "active numel", "active 0", "crc32 max", "crc32 0", "no metadata"])
def test_header_values_at_the_limits_are_accepted(tmp_path, good, mutate):
    mf = read_file(tmp_path, rewrite_header(good, mutate))
    assert len(mf.tensors) == 2


def test_eight_dimensions_decode(tmp_path, good):
    mf = read_file(tmp_path, rewrite_header(good, set_field("tensors/0/shape", [1] * 6 + [3, 4])))
    got = mf.masks()["0.weight"]
    assert got.shape == (1,) * 6 + (3, 4) and torch.equal(got.reshape(3, 4), fixed_masks()["0.weight"])


def test_tensor_over_2_32_elements(tmp_path):
    # lzma: no expansion bound ties the payload length to the shape, so only this rule applies
    good_lzma = save_good(tmp_path, "lzma", name="good_lzma.mask")
    ok = rewrite_header(good_lzma, set_field("tensors/0/shape", [1 << 16, 1 << 16]))
    assert read_file(tmp_path, ok).tensors[0].numel == 1 << 32
    bad = rewrite_header(good_lzma, set_field("tensors/0/shape", [1 << 16, (1 << 16) + 1]))
    with refused(tmp_path, f"{T0} declares {(1 << 32) + (1 << 16)} elements, more than the "
                                          f"limit {1 << 32}"):
        read_file(tmp_path, bad)


def test_dimension_over_2_32(tmp_path, good_zstd):
    ok = rewrite_header(good_zstd, lambda h: h["tensors"][0].update(shape=[1 << 32, 0], active=0))
    assert read_file(tmp_path, ok).tensors[0].shape == (1 << 32, 0)
    bad = rewrite_header(good_zstd, lambda h: h["tensors"][0].update(shape=[(1 << 32) + 1, 0], active=0))
    with refused(tmp_path, re.escape(f"{DIM}, got "
                                                    f"{(1 << 32) + 1}")):
        read_file(tmp_path, bad)


def test_duplicated_name(tmp_path, good):
    # the second tensor renamed: offsets, lengths and raw sizes all still agree
    with refused(tmp_path, f"{T0} appears twice"):
        read_file(tmp_path, rewrite_header(good, set_field("tensors/1/name", "0.weight")))


def test_raw_payload_length_disagrees_with_the_shape(tmp_path, good):
    with refused(tmp_path, re.escape(f"{T0} has shape [3, 40] (120 bits) but a 2-byte raw "
                                                    "payload; expected 15")):
        read_file(tmp_path, rewrite_header(good, set_field("tensors/0/shape", [3, 40])))


# ------------------------------------------------------------------------------ tiling


def _with_gap(good: bytes) -> bytes:
    """One spare byte between the two tensors; every later offset moved to match."""
    header, blobs = file_blobs(good)
    header["tensors"][1]["offset"] += 1
    header["extras"]["offset"] += 1
    section = blobs[0] + b"\x00" + b"".join(blobs[1:])
    return pack_file(deflate(json.dumps(header).encode()), section)


def test_entries_with_a_gap(tmp_path, good):
    with refused(tmp_path, "tensor '1.weight' starts at 3, expected 2: entries must follow "
                                          "each other without gaps or overlaps"):
        read_file(tmp_path, _with_gap(good))


def test_entries_that_overlap(tmp_path, good):
    with refused(tmp_path, "tensor '1.weight' starts at 1, expected 2"):
        read_file(tmp_path, rewrite_header(good, set_field("tensors/1/offset", 1)))


def test_extras_that_do_not_follow_the_tensors(tmp_path, good):
    with refused(tmp_path, "extras start at 10, expected 9"):
        read_file(tmp_path, rewrite_header(good, set_field("extras/offset", 10)))


def test_entries_that_run_past_the_end(tmp_path, good):
    header, _ = split_file(good)
    n = header["extras"]["offset"] + header["extras"]["length"]
    with refused(tmp_path, f"entries cover {n} data bytes but the file holds {n - 1}: "
                                          "truncated file"):
        read_file(tmp_path, good[:-1])  # the last byte of the extras is missing


def test_trailing_bytes(tmp_path, good):
    n = sum(len(b) for b in file_blobs(good)[1])
    with refused(tmp_path, f"entries cover {n} data bytes but the file holds {n + 1}: "
                                          ".*trailing garbage"):
        read_file(tmp_path, good + b"\x00")


def test_no_tensors_and_no_extras_is_a_valid_empty_file(tmp_path, good):
    header = {**split_file(good)[0], "tensors": [], "extras": None}
    empty = pack_file(deflate(json.dumps(header).encode()), b"")
    mf = read_file(tmp_path, empty)
    assert mf.masks() == {} and mf.extras == {}
    with refused(tmp_path, "entries cover 0 data bytes but the file holds 1"):
        read_file(tmp_path, empty + b"\x00")


# ------------------------------------------------------------------- messages, word for word


def _past_end(good):
    data = good[:10] + struct.pack("<I", struct.unpack("<I", good[10:14])[0] + 1000) + good[14:]
    hlen = struct.unpack("<I", data[10:14])[0]
    return data, (f"header length {hlen} runs past the end of the {len(data)}-byte file (truncated or "
                  "corrupted)")


def _bad_crc(good):
    crc = struct.unpack("<I", good[14:18])[0] ^ 1
    return good[:14] + struct.pack("<I", crc) + good[18:], "header checksum mismatch: the file is corrupted"


def _expansion(good):
    length = split_file(good)[0]["extras"]["length"]
    return (rewrite_header(good, set_field("extras/size", 1 << 30)),
            f"extras declare {1 << 30} bytes from a {length}-byte blob: refusing (corrupted or hostile file)")


def _fixed(mutate, message):
    return lambda good: (mutate(good), message)


def _header(mutate):
    return lambda good: rewrite_header(good, mutate)


KEYS_12 = {f"k{i:02d}": 0 for i in range(12)}
FIRST_10 = "['backbone', 'codec', 'extras', 'k00', 'k01', 'k02', 'k03', 'k04', 'k05', 'k06']"
EXACT = [
    ("short", _fixed(lambda g: g[:17], "file is truncated (17 bytes): not a complete .mask file")),
    ("magic", _fixed(lambda g: b"\x89MASX\r\n\x1a" + g[8:], "not a .mask file (bad magic bytes)")),
    ("version", _fixed(lambda g: g[:8] + b"\x03\x00" + g[10:], "unsupported .mask format version 3; this "
                       "maskpack reads versions 1 and 2: upgrade maskpack")),
    ("past end", _past_end),
    ("crc", _bad_crc),
    ("not object", _fixed(lambda g: pack_file(deflate(b"[1]"), split_file(g)[1]),
                          "header is not a JSON object")),
    ("keys", _fixed(_header(lambda h: h.update(KEYS_12)), f"header keys must be {KEYS}, got {FIRST_10}")),
    ("backbone", _fixed(_header(set_field("backbone/name", 1)), BACKBONE)),
    ("codec", _fixed(_header(set_field("codec", 1)), "header 'codec' must be a string")),
    ("metadata", _fixed(_header(set_field("metadata", [])), "header 'metadata' must map strings to strings")),
    ("tensors", _fixed(_header(set_field("tensors", None)), "header 'tensors' must be a list")),
    ("expansion", _expansion),
]


@pytest.mark.parametrize("make", [c[1] for c in EXACT], ids=[c[0] for c in EXACT])
def test_messages_are_exact(tmp_path, good, make):
    data, message = make(good)
    with pytest.raises(FormatError) as info:
        read_file(tmp_path, data)
    assert str(info.value) == f"{tmp_path / 'bad.mask'}: {message}"


def test_header_length_limit_message_is_exact(tmp_path, good, monkeypatch):
    monkeypatch.setattr(container, "MAX_HEADER", 4096)
    with pytest.raises(FormatError) as info:
        read_file(tmp_path, pack_file(_padded_header(good, 4097), split_file(good)[1]))
    expected = "header length 4097 is over the limit 4096 (corrupted or hostile file)"
    assert str(info.value) == f"{tmp_path / 'bad.mask'}: {expected}"


# ------------------------------------------- metadata, names and counts: the reader and the writer

def _save(tmp_path, **kw):
    maskpack.save(tmp_path / "w.mask", fixed_masks(), fixed_net(), codec="raw", **kw)


def test_metadata_and_count_limits_name_the_file(tmp_path, good):
    from maskpack.storage.header import MAX_METADATA_BYTES

    text = "v" * MAX_METADATA_BYTES  # with the key "k": one byte over
    for mutate, message in [
        (set_field("metadata", {"k": text}), f"metadata holds {MAX_METADATA_BYTES + 1} bytes of text, more "
                                              f"than the limit {MAX_METADATA_BYTES}"),
        (set_field("backbone/name", "n" * 1025), "header backbone name must be valid text of at most 1024 "
                                                 "characters"),
    ]:
        with pytest.raises(FormatError) as info:
            read_file(tmp_path, rewrite_header(good, mutate))
        assert str(info.value) == f"{tmp_path / 'bad.mask'}: {message}"
    read_file(tmp_path, rewrite_header(good, set_field("backbone/name", "n" * 1024)))  # at the limit


def test_a_lone_surrogate_in_metadata_is_refused_by_the_reader(tmp_path, good):
    text = json.dumps({**split_file(good)[0], "metadata": {"k\ud800": "v"}}).encode()  # escaped: valid JSON
    with pytest.raises(FormatError) as info:
        read_file(tmp_path, pack_file(deflate(text), split_file(good)[1]))
    assert str(info.value) == (f"{tmp_path / 'bad.mask'}: metadata 'k\\ud800' is not valid Unicode text "
                               "(lone surrogate)")


@pytest.mark.parametrize("metadata,message", [
    ({f"k{i}": "" for i in range(1025)}, "metadata has 1025 keys, more than the limit 1024"),
    ({"x" * 257: ""}, f"metadata key {'x' * 40!r}... has 257 characters, more than the limit 256"),
    ({"k": "\ud800"}, "metadata 'k' is not valid Unicode text (lone surrogate)"),
    ({"k": "v" * (1 << 20)}, "metadata holds 1048577 bytes of text, more than the limit 1048576"),
], ids=["keys", "key length", "surrogate", "text"])
def test_the_writer_refuses_what_the_reader_would(tmp_path, metadata, message):
    with pytest.raises(FormatError) as info:
        _save(tmp_path, metadata=metadata)
    assert str(info.value) == f"<new file>: {message}"
    assert not (tmp_path / "w.mask").exists()


def test_the_writer_refuses_a_header_over_the_inflate_limit(tmp_path, monkeypatch):
    from maskpack.storage import header as hdr

    monkeypatch.setattr(hdr, "inflate_limit", lambda n: 600)
    over = (r"^<new file>: the header would inflate from \d+ to \d+ bytes, over the reader's limit 600: "
            r"store fewer tensors or less metadata$")
    with pytest.raises(FormatError, match=over):
        _save(tmp_path, metadata={"k": "v" * 400})
    _save(tmp_path, metadata={"k": "v"})  # a header under the limit is written


# ------------------------------------------------------------ the JSON parser's own limits, exactly

def _text_file(tmp_path, good, text: str):
    return read_file(tmp_path, pack_file(deflate(text.encode()), split_file(good)[1]))


def _with_tensors(good, n: int) -> str:
    """The valid header with ``n`` extra empty objects in a list: ``n`` more JSON objects."""
    header = split_file(good)[0]
    header["metadata"] = {}
    text = json.dumps(header)
    return text[:-1] + ', "pad": [' + ", ".join(["{}"] * n) + "]}"


def test_json_object_count_limit_is_exact(tmp_path, good):
    from maskpack.storage.header import MAX_OBJECTS

    base = 1 + 1 + 1 + 2 + 1  # top level, backbone, metadata, two tensors, extras
    with pytest.raises(FormatError) as info:
        _text_file(tmp_path, good, _with_tensors(good, MAX_OBJECTS - base + 1))
    assert str(info.value) == (f"{tmp_path / 'bad.mask'}: header has more than {MAX_OBJECTS} JSON objects "
                               "(at most 16384 tensors); corrupted or hostile file")
    with pytest.raises(FormatError, match="header keys must be"):  # at the limit: parsed, then refused
        _text_file(tmp_path, good, _with_tensors(good, MAX_OBJECTS - base))


def test_a_repeated_key_is_named_even_when_it_is_not_the_first(tmp_path, good):
    text = json.dumps(split_file(good)[0])
    with pytest.raises(FormatError) as info:
        _text_file(tmp_path, good, text[:-1] + ', "codec": "raw"}')
    expected = "header repeats the key 'codec': corrupted or hostile file"
    assert str(info.value) == f"{tmp_path / 'bad.mask'}: {expected}"


def test_twenty_digit_integers_are_parsed_and_twenty_one_refused(tmp_path, good):
    text = json.dumps(split_file(good)[0])
    twenty = text.replace('"active": 8', '"active": ' + "9" * 20)
    parsed = r"active count must be an integer in 0\.\.12, got 9{20}$"  # parsed, then the field check
    with pytest.raises(FormatError, match=parsed):
        _text_file(tmp_path, good, twenty)
    with pytest.raises(FormatError, match="header holds a 21-digit number, more than the limit 20"):
        _text_file(tmp_path, good, text.replace('"active": 8', '"active": ' + "9" * 21))


def test_a_lone_surrogate_in_the_backbone_name_is_refused(tmp_path, good):
    text = json.dumps(split_file(good)[0]).replace('"name": "Sequential"', '"name": "Seq\\ud800"')
    assert "\\ud800" in text
    with pytest.raises(FormatError) as info:
        _text_file(tmp_path, good, text)
    assert str(info.value) == (f"{tmp_path / 'bad.mask'}: header backbone name must be valid text of at most "
                               "1024 characters")
