"""Every codec round-trips exactly; decoders reject bad payloads with CodecError, never overrun."""

import bz2
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maskpack.errors import CodecError
from maskpack.storage import bits, entropy
from maskpack.storage.codecs import available_codecs, get_codec

CODECS = available_codecs()


def _case(n: int, density: float, seed: int, tie: bool):
    rng = np.random.default_rng(seed)
    absw = (np.zeros(n) if tie else np.abs(rng.standard_normal(n))).astype(np.float32)
    # Density grows with |W|, as in real masks, so the contexts matter.
    p = density * (0.5 + absw / (absw.max() + 1e-9)) if n else np.zeros(0)
    return rng.random(n) < np.clip(p, 0, 1), absw


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODECS), n=st.integers(0, 5000),
       density=st.sampled_from([0.0, 0.001, 0.05, 0.3, 0.5, 0.7, 0.95, 1.0]),
       seed=st.integers(0, 2**16), tie=st.booleans())
def test_roundtrip(codec, n, density, seed, tie):
    mask, absw = _case(n, density, seed, tie)
    c = get_codec(codec)
    payload = c.encode(mask, absw)
    out = c.decode(payload, n, absw)
    assert out.dtype == bool and out.shape == (n,)
    np.testing.assert_array_equal(out, mask)
    assert c.encode(mask, absw) == payload  # deterministic


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [0, 1, 8, 63, 64, 65, 20000])
@pytest.mark.parametrize("fill", [False, True])
def test_constant_masks(codec, n, fill):
    mask = np.full(n, fill)
    absw = np.linspace(0, 1, n, dtype=np.float32)
    c = get_codec(codec)
    np.testing.assert_array_equal(c.decode(c.encode(mask, absw), n, absw), mask)


def test_ans_bucket_with_p_zero_and_one():
    # Small |w| always kept, large |w| always dropped: every bucket is degenerate.
    absw = np.arange(10000, dtype=np.float32)
    mask = absw < 5000
    c = get_codec("ans")
    payload = c.encode(mask, absw)
    assert len(payload) < 40  # only counts, no coded data
    np.testing.assert_array_equal(c.decode(payload, mask.size, absw), mask)


def test_ans_beats_general_codecs_and_is_near_entropy():
    rng = np.random.default_rng(0)
    absw = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    mask = ~(rng.random(absw.size) < 0.02 + 0.2 * absw / absw.max())
    ans = len(get_codec("ans").encode(mask, absw))
    best = min(len(get_codec(c).encode(mask)) for c in ("gzip", "bz2", "lzma", "zstd"))
    bound = entropy.conditional_entropy_bits(mask, absw) / 8
    assert ans <= 0.92 * best  # the 0.85x target is measured on real masks in bench/codecs.py
    assert ans <= 1.02 * bound


def test_ans_escape_runs():
    # A minority that all sits at the end of its bucket: long runs exercise the escape symbol.
    n = 300_000
    absw = np.ones(n, dtype=np.float32)
    mask = np.ones(n, bool)
    mask[-100:] = False
    c = get_codec("ans")
    np.testing.assert_array_equal(c.decode(c.encode(mask, absw), n, absw), mask)


def test_ans_needs_backbone_for_buckets():
    absw = np.random.default_rng(1).random(5000).astype(np.float32)
    mask = absw > 0.3
    payload = get_codec("ans").encode(mask, absw)
    with pytest.raises(CodecError, match="needs the backbone"):
        get_codec("ans").decode(payload, mask.size, None)
    with pytest.raises(CodecError, match="elements"):
        get_codec("ans").decode(payload, mask.size, absw[:-1])


def test_unknown_codec_and_levels():
    with pytest.raises(CodecError, match="unknown codec 'brotli'"):
        get_codec("brotli")
    with pytest.raises(CodecError, match="levels 1..22"):
        get_codec("zstd").check_level(40)
    with pytest.raises(CodecError, match="no compression levels"):
        get_codec("raw").check_level(3)
    mask = np.ones(1000, bool)
    for lv in (1, 22):
        c = get_codec("zstd")
        assert c.decode(c.encode(mask, level=lv), 1000).all()


def test_raw_bit_order_is_little():
    assert bits.pack(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], bool)) == b"\x01\x01"
    with pytest.raises(CodecError, match="padding"):
        bits.unpack(b"\x01\x02", 9)
    with pytest.raises(CodecError, match="expected 2"):
        bits.unpack(b"\x01", 9)


@pytest.mark.parametrize("codec", ["gzip", "bz2", "lzma", "lz4", "snappy", "zstd"])
def test_decompression_bomb_is_capped(codec):
    # A payload that inflates to 1 MB claims to be a 100-bit mask: refused, and never 1 MB allocated.
    big = np.ones(8_000_000, bool)
    c = get_codec(codec)
    with pytest.raises(CodecError, match="more than the expected 13 bytes|declares|does not decode"):
        c.decode(c.encode(big), 100)


CUT = {"raw": "packed mask has", "gzip": "truncated", "bz2": "truncated", "lzma": "truncated",
       "lz4": "does not decode", "snappy": "declares|does not decode", "zstd": "does not decode|truncated",
       "ans": "empty|no coded data|not a whole number of 32-bit words"}
TRAILING = {"raw": "packed mask has 505 bytes", "gzip": "trailing bytes", "bz2": "trailing bytes",
            "lzma": "trailing bytes", "lz4": "does not decode", "snappy": "does not decode",
            "zstd": "trailing bytes", "ans": "not a whole number of 32-bit words"}


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_payloads(codec):
    rng = np.random.default_rng(2)
    absw = rng.random(4000).astype(np.float32)
    c = get_codec(codec)
    good = c.encode(absw > 0.1, absw)
    # a payload cut short or followed by junk is refused, never decoded to some other mask
    for cut in (0, 1, len(good) // 2, len(good) - 1):
        with pytest.raises(CodecError, match=CUT[codec]):
            c.decode(good[:cut], 4000, absw)
    with pytest.raises(CodecError, match=TRAILING[codec]):
        c.decode(good + b"\x00\x00\x00\x00\x01", 4000, absw)


def test_ans_count_rules():
    absw = np.ones(1 << 20, dtype=np.float32)
    with pytest.raises(CodecError, match="buckets"):
        get_codec("ans").decode(bytes([9, 0]), 10, absw[:10])
    with pytest.raises(CodecError, match="claims"):
        get_codec("ans").decode(bytes([0, 11]), 10, absw[:10])


def _declared_ones(payload: bytes, absw: np.ndarray) -> int:
    """Sum of the bucket counts of an ans payload (docs/format.md): layout 0 has them at the start
    (u8 log2(B), then B LEB128 varints), layout 1 at the start of its ANS stream."""
    if payload[0] >> 4:
        import constriction

        from maskpack.storage.entropy import TensorContexts, _decode_counts

        sizes = TensorContexts(absw).order(payload[0] & 0x0F)[1].tolist()
        words = np.frombuffer(payload, dtype="<u4", offset=1).astype(np.uint32)
        return sum(_decode_counts(constriction.stream.stack.AnsCoder(words), sizes))
    pos, total = 1, 0
    for _ in range(1 << payload[0]):
        value, shift = 0, 0
        while True:
            byte = payload[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        total += value
    return total


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=64), n=st.integers(0, 300))
def test_ans_fuzz_only_codec_errors_and_declared_counts(data, n):
    # Random bytes are refused with CodecError, or decode to a mask with exactly the number of
    # ones their bucket counts declare (the decoder never invents or drops an entry).
    absw = np.linspace(0, 1, n, dtype=np.float32)
    try:
        out = get_codec("ans").decode(data, n, absw)
    except CodecError:
        return
    assert out.shape == (n,) and out.dtype == bool
    assert int(out.sum()) == _declared_ones(data, absw)


def test_gzip_is_deterministic_and_standard():
    c = get_codec("gzip")
    mask = np.arange(1000) % 3 == 0
    payload = c.encode(mask)
    assert zlib.decompress(payload, wbits=31) == bits.pack(mask)
    assert bz2.decompress(get_codec("bz2").encode(mask)) == bits.pack(mask)


# ------------------------------------------------------------------- ans: the format, pinned


def _golden_case(n: int, seed: int, base: float, slope: float, power: float):
    rng = np.random.default_rng(seed)
    absw = np.abs(rng.standard_normal(n)).astype(np.float32)
    p = np.clip(base + slope * (absw / absw.max()) ** (1 / power), 0, 1)
    return rng.random(n) < p, absw


# (case, log2 of the bucket count the encoder picks, sha256 of the payload): the bucket choice,
# thresholds, count and gap models and word layout of docs/format.md "ans" (layout 1). If these
# change, the format changed. Layout 0 (format version 1) payloads: tests/test_format_v1.py.
ANS_GOLDEN = [
    ((63, 1, 0.3, 0.4, 1), 0, "df2abd9bf862211eb9fb552043ba1d9911afc6ce225d3fbfb552b99740636461"),
    ((64, 2, 0.05, 0.9, 1), 1, "66d0965618e1efa93dc3bb63c52d9ce19ae2eda97ad3e21fa473ec638b448d12"),
    ((4000, 7, 0.45, 0.0, 1), 0, "31b938ab100f5986804a4cf31d30089dca348770394beb160b7162d9d9bdbe43"),
    ((5000, 3, 0.02, 0.3, 1), 2, "2a7210550fe3c53c58de1fe70d781f209f08aea7a4e52b23e7be3d1112d7ee7e"),
    ((20000, 6, 0.4, 0.2, 1), 1, "9279f6048936d0764e1f446a87be5315cbc8f16016f2a76d5fb10da626af8453"),
    ((20000, 5, 0.0, 0.6, 1), 3, "3e78f537c34b160466b39580ef29e443efa3d397769fc63b03dff065c2fb9c03"),
    ((100000, 11, 0.0, 1.0, 3), 4, "a1653209770b58cb69e8c96d9b62ce0d4d02a59f19a8be23c91d7da6a7b3f0f5"),
    ((100000, 8, 0.001, 0.01, 1), 2, "ee8fb212ee9e3467ab4b90757beff295bd937a1cdbbde2fcd12a5e9c249554f4"),
]


def test_ans_sparse_payload_bytes_are_pinned():
    # 2 zeros in 300,000: K is capped at 4096, so rho = (1-p)^K is near 1 and escapes are likely
    import hashlib

    mask = np.ones(300_000, bool)
    mask[[1234, 250_000]] = False
    payload = get_codec("ans").encode(mask, None)
    assert hashlib.sha256(payload).hexdigest() == \
        "d32fc8eee2be2c5bd9e44e594959da89a04e19d45d84317f7a070a52043ac69f"
    np.testing.assert_array_equal(get_codec("ans").decode(payload, mask.size, None), mask)


@pytest.mark.parametrize("case,lb,digest", ANS_GOLDEN, ids=[f"{c[0][0]}-lb{c[1]}" for c in ANS_GOLDEN])
def test_ans_payload_bytes_are_pinned(case, lb, digest):
    import hashlib

    mask, absw = _golden_case(*case)
    c = get_codec("ans")
    payload = c.encode(mask, absw)
    assert payload[0] == 0x10 | lb  # layout 1, 2**lb buckets
    assert hashlib.sha256(payload).hexdigest() == digest
    np.testing.assert_array_equal(c.decode(payload, mask.size, absw), mask)


def test_ans_buckets_need_64_elements():
    rng = np.random.default_rng(0)
    absw = np.arange(64, dtype=np.float32)
    mask = absw < 32  # perfectly predicted by |W|: more buckets pay off from 64 elements on
    assert get_codec("ans").encode(mask, absw)[0] & 0x0F > 0
    assert get_codec("ans").encode(mask[:63], absw[:63])[0] & 0x0F == 0
    mask = rng.random(1000) < 0.3
    payload = get_codec("ans").encode(mask, None)  # no backbone: one bucket, decodable without it
    assert payload[0] == 0x10
    np.testing.assert_array_equal(get_codec("ans").decode(payload, 1000, None), mask)


def test_ans_bucket_with_exactly_half_ones():
    mask = np.arange(10) % 2 == 0  # 5 of 10: the ones are the coded minority
    c = get_codec("ans")
    np.testing.assert_array_equal(c.decode(c.encode(mask, None), 10, None), mask)


def test_ans_buckets_with_opposite_majorities():
    # Large |w| all off, small |w| all on, and the reverse: each bucket's majority is restored,
    # whichever comes first.
    absw = np.arange(10000, dtype=np.float32)
    c = get_codec("ans")
    for mask in (absw >= 5000, absw < 5000, (absw >= 2500) & (absw < 7500), absw >= 7500):
        payload = c.encode(mask, absw)
        assert payload[0] > 0
        np.testing.assert_array_equal(c.decode(payload, mask.size, absw), mask)


def test_ans_escaped_quotients():
    # One bucket, K = 4096: a gap of 64 * 4096 codes as an escape, then 0; gaps that reach the
    # bucket's end use the largest quotient allowed; two escapes in one round are decoded together.
    c = get_codec("ans")
    for n, off in ((300_000, [64 * 4096 + 5]), (300_000, [299_999]), (600_000, [270_000, 560_000]),
                   (600_000, [128 * 4096, 599_999]), (262_200, [262_199])):  # last: q = q_max = 64
        mask = np.ones(n, bool)
        mask[off] = False
        np.testing.assert_array_equal(c.decode(c.encode(mask, None), n, None), mask)


@pytest.mark.parametrize("payload,n", [("00058679b5e392a6ac12", 21), ("0004a3d631b8", 26)],
                         ids=["last rank = bucket size", "past it"])
def test_ans_positions_past_the_bucket_end(payload, n):
    with pytest.raises(CodecError, match="ans payload decodes to positions past the end of its bucket"):
        get_codec("ans").decode(bytes.fromhex(payload), n, None)


def test_ans_contexts_follow_the_documented_quantiles():
    absw = np.arange(10, dtype=np.float32)
    # sorted sample a[::1], thresholds at floor(j * 10 / 4), j = 1..3
    np.testing.assert_array_equal(entropy.thresholds(absw, 4), [2.0, 5.0, 7.0])
    assert entropy.thresholds(absw, 1).size == 0 and entropy.thresholds(absw[:0], 4).size == 0
    np.testing.assert_array_equal(entropy.contexts(absw, 4), [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    ctx = entropy.TensorContexts(absw)
    order, sizes = ctx.order(0)
    assert order is None and sizes.tolist() == [10]
    order, sizes = ctx.order(2)
    assert order.tolist() == list(range(10)) and sizes.tolist() == [2, 3, 2, 3]
    # contexts are float32: |W| given in float64 buckets like its float32 rounding (all ties here)
    wide = 1.0 + np.arange(5000) * 1e-12
    mask = np.arange(5000) < 1500  # what float64 contexts would predict perfectly
    c = get_codec("ans")
    np.testing.assert_array_equal(c.decode(c.encode(mask, wide), 5000, wide.astype(np.float32)), mask)


def test_conditional_entropy_bits_exact_values():
    h = lambda p: -(p * np.log2(p) + (1 - p) * np.log2(1 - p))  # noqa: E731
    absw = np.arange(8, dtype=np.float32)
    mask = np.array([1, 0, 0, 0, 1, 1, 1, 1], bool)
    # 2 buckets (threshold 4): {1 of 4}, {4 of 4}; 1 bucket: 5 of 8
    assert entropy.conditional_entropy_bits(mask, absw, 2) == pytest.approx(4 * h(0.25))
    assert entropy.conditional_entropy_bits(mask, absw, 1) == pytest.approx(8 * h(5 / 8))
    assert entropy.conditional_entropy_bits(mask.reshape(2, 4), absw, 1) == pytest.approx(8 * h(5 / 8))
    # one-element buckets carry no information
    assert entropy.conditional_entropy_bits(np.array([True, False]), absw[:2], 2) == 0.0
    rng = np.random.default_rng(1)
    big, w = rng.random(5000) < 0.2, rng.random(5000).astype(np.float32)
    assert entropy.conditional_entropy_bits(big, w) == entropy.conditional_entropy_bits(big, w, 16)


def test_codec_payloads_follow_the_format():
    import lzma

    import lz4.block
    import zstandard

    rng = np.random.default_rng(3)
    mask = rng.random(20000) < 0.1
    packed = bits.pack(mask)
    assert get_codec("lz4").encode(mask) == lz4.block.compress(packed, store_size=False)
    assert get_codec("lz4").encode(mask, level=12) == lz4.block.compress(
        packed, mode="high_compression", compression=12, store_size=False)
    zs = get_codec("zstd").encode(mask)
    ref = zstandard.ZstdCompressor(level=19, write_content_size=True, write_checksum=False)
    assert zs == ref.compress(packed)
    assert zstandard.get_frame_parameters(zs).content_size == len(packed)
    assert not zstandard.get_frame_parameters(zs).has_checksum
    for level in (0, 9):
        assert get_codec("lzma").encode(mask, level=level) == lzma.compress(
            packed, format=lzma.FORMAT_RAW,
            filters=[{"id": lzma.FILTER_LZMA2, "preset": level, "dict_size": max(4096, len(packed))}])
    assert get_codec("lzma").encode(mask) == get_codec("lzma").encode(mask, level=9)
    # snappy's length prefix of a 20000-byte mask takes 3 varint bytes
    big = rng.random(160_000) < 0.5
    np.testing.assert_array_equal(get_codec("snappy").decode(get_codec("snappy").encode(big), big.size), big)
    assert available_codecs() == ["raw", "gzip", "bz2", "lzma", "lz4", "snappy", "zstd", "ans"]


def test_gzip_codec_takes_gzip_only():
    packed = bits.pack(np.ones(100, bool))
    with pytest.raises(CodecError, match="gzip payload does not decode"):
        get_codec("gzip").decode(zlib.compress(packed), 100)  # a zlib stream, not gzip


def test_snappy_length_prefix_rules():
    with pytest.raises(CodecError, match="snappy payload has a malformed length prefix"):
        get_codec("snappy").decode(b"\x80\x80\x80\x80\x80\x01", 100)


def test_ans_codec_messages():
    with pytest.raises(CodecError, match="the ans codec needs the backbone's weights to decode: pass the "
                                         "backbone"):
        get_codec("ans").decode(bytes([1, 0, 0]), 100, None)


BZ2, GZ = bz2.compress(b"\x01\x02"), zlib.compress(b"", wbits=31)
ZS = __import__("zstandard").ZstdCompressor(write_content_size=True).compress(b"\x01\x02")
TRUNC, TRAIL = "payload is truncated (compressed stream has no end)", "payload has trailing bytes after the"


@pytest.mark.parametrize("codec,payload,numel,message", [
    ("bz2", BZ2[:-1], 16, TRUNC),
    ("bz2", BZ2 * 2, 16, f"{TRAIL} compressed stream"),
    ("gzip", GZ[:-1], 0, f"gzip {TRUNC}"),
    ("gzip", GZ * 2, 0, f"gzip {TRAIL} compressed stream"),
    ("zstd", ZS[:-1], 16, f"zstd {TRUNC}"),
    ("zstd", ZS * 2, 16, "zstd payload has trailing bytes after the frame"),
    ("lz4", b"\x00\x00", 0, "lz4 payload of an empty mask must be one zero byte"),
    ("snappy", b"\x80\x80\x80\x80\x80", 8, "snappy payload has a malformed length prefix"),
    ("snappy", b"\x05", 8, "snappy payload declares 5 bytes, expected 1"),
    ("ans", b"", 8, "ans payload is empty"),
    ("ans", bytes([0]), 8, "ans payload is truncated inside its bucket counts"),
    ("ans", bytes([0]) + b"\x80" * 10, 8, "ans payload has a malformed bucket count"),
    ("ans", bytes([0, 1, 0]), 8, "ans payload's coded part is not a whole number of 32-bit words"),
    ("ans", bytes([0, 0, 1, 0, 0, 0]), 8, "ans payload has coded data but its bucket counts need none"),
    ("ans", bytes([9, 0]), 8, "ans payload declares 512 buckets; at most 16 are allowed"),
    ("ans", bytes([0x1F]), 8, "ans payload declares 32768 buckets; at most 16 are allowed"),
    ("ans", bytes([0x20, 0, 0, 0, 0]), 8, "ans payload has layout 2; this maskpack reads layouts 0 and 1: "
     "upgrade maskpack"),
    ("ans", bytes([200, 0]), 8, "ans payload has layout 12; this maskpack reads layouts 0 and 1: upgrade "
     "maskpack"),
    ("ans", bytes([0x14]), 8, "ans payload has no coded data for its 16 buckets"),
    ("ans", bytes([0x10]) + (1).to_bytes(4, "little") * 2, 8,
     "ans payload has coded data after its last symbol"),
    ("ans", bytes([0x11, 0, 0, 0, 0]), 8,
     "the ans codec needs the backbone's weights to decode: pass the backbone"),
    ("ans", bytes.fromhex("000121d7d982f8bd1045"), 10**6, "ans payload decodes to a run longer than its "
     "bucket"),
    ("ans", bytes.fromhex("0004a3d631b8"), 26, "ans payload decodes to positions past the end of its bucket"),
    ("ans", bytes([0, 9]), 8, "ans bucket 0 claims 9 ones but holds 8 elements"),
    ("ans", bytes([1, 0, 0]), 8, "the ans codec needs the backbone's weights to decode: pass the backbone"),
    ("raw", b"\x01\x80", 9, "packed mask has non-zero padding bits"),
])
def test_codec_messages_are_exact(codec, payload, numel, message):
    with pytest.raises(CodecError) as info:
        get_codec(codec).decode(payload, numel, None)
    assert str(info.value) == message


def test_library_errors_name_their_type():
    with pytest.raises(CodecError, match=r"^ans payload is not valid coded data: "):
        get_codec("ans").decode(bytes([0, 3]) + b"\x00" * 4, 10, None)  # a zero last word
    with pytest.raises(CodecError, match="lz4 payload does not decode: LZ4BlockError: "):
        get_codec("lz4").decode(b"\xff\xff", 16)
    with pytest.raises(CodecError, match="zstd payload does not decode: ZstdError: "):
        get_codec("zstd").decode(b"\x28\xb5\x2f\xfd\x20\x02" + b"\xff" * 8, 16)
