"""The bucket counts of ``ans`` payload layout 1 (docs/format.md "ans"): their model, worked out by
hand, and their round trip through the ANS stream."""

import math

import constriction
import numpy as np
import pytest

from maskpack.storage.entropy import _count_bits, _count_symbols, _decode_counts, _encode_counts, _low_size


def _l_bits(length: int, lmax: int, prev: int | None) -> float:
    """-log2 P(L) of the model, written out independently."""
    if prev is None:
        return math.log2(lmax + 1)
    weights = [2.0 ** -abs(x - min(prev, lmax)) for x in range(lmax + 1)]
    return -math.log2(weights[length] / sum(weights))


@pytest.mark.parametrize("sizes,counts,bits", [
    # n 8, all zeros: L = 0 of 0..3 (first bucket: uniform, 2 bits), then the first flag (1 bit)
    ([8], [0], 2 + 1),
    # all ones: the same, flag 1
    ([8], [8], 2 + 1),
    # 5 of 10: a tie, the ones are the minority and no flag is coded; L = 3 of 0..3, mantissa
    # 5 - 4 = 1 of min(4, 5 - 4 + 1) = 2 values
    ([10], [5], 2 + 1),
    # 37 of 100: L = 6 of 0..6, mantissa 37 - 32 of min(32, 50 - 32 + 1) = 19 values, flag
    ([100], [37], math.log2(7) + math.log2(19) + 1),
    # 63 of 100: the same minority (37) and the other flag
    ([100], [63], math.log2(7) + math.log2(19) + 1),
    # an empty bucket codes nothing; a one-element bucket only its flag (L has one value)
    ([0, 1], [0, 1], 1),
    # 2**20 elements, 300,000 ones: L = 19 of 0..20, the mantissa's 262,144 values as a high piece
    # (4 values) and a 16-bit low piece, then the flag
    ([1 << 20], [300_000], math.log2(21) + 2 + 16 + 1),
    # 362,000 of 724,288 (h 362,144): L = 19 of 0..19, min(262,144, 100,001) = 100,001 values: a high
    # piece of 2 values, and in the last high value only 100,000 & 0xFFFF + 1 = 34,465 low values
    ([724_288], [362_000], math.log2(20) + 1 + math.log2(34_465) + 1),
    # 393,216 of 786,432 (a tie): L = 19, 131,073 values: a high piece of 3 values and, in the last,
    # a one-value low piece (not coded); no flag
    ([786_432], [393_216], math.log2(20) + math.log2(3)),
])
def test_one_bucket_costs(sizes, counts, bits):
    assert _count_bits(sizes, counts) == pytest.approx(bits, abs=1e-9)


def test_later_buckets_are_predicted_from_the_previous_one():
    # bucket 1: 8 of 8 ones (L 0: 2 bits, flag 1: 1 bit); bucket 2: 1 of 8 (L 1 given L' = 0,
    # no mantissa, flag 0 against the previous 1: 1/8); bucket 3: 7 of 8 (L 1 given 1, flag 1
    # against 0: 1/8); bucket 4: 6 of 8 (L 2 given 1, mantissa 2 - 2 of min(2, 4 - 2 + 1) = 2
    # values, flag 1 again: 7/8)
    expected = (2 + 1
                + _l_bits(1, 3, 0) + 3
                + _l_bits(1, 3, 1) + 3
                + _l_bits(2, 3, 1) + 1 - math.log2(7 / 8))
    assert _count_bits([8, 8, 8, 8], [8, 1, 7, 6]) == pytest.approx(expected, abs=1e-9)
    # the previous L is capped at the current bucket's largest: 7 of 16 (L' = 3 of 0..4, mantissa
    # 3 of min(4, 8 - 4 + 1) = 4 values, flag), then 2 of 4 (L = 2 of 0..2, P uses |2 - min(3, 2)|;
    # a one-value mantissa and a tie: nothing else)
    assert _count_bits([16, 4], [7, 2]) == pytest.approx(
        math.log2(5) + math.log2(4) + 1 + _l_bits(2, 2, 3), abs=1e-9)
    assert _l_bits(2, 2, 3) == pytest.approx(-math.log2(1 / 1.75))


def test_low_piece_sizes():
    assert [_low_size(hi, 100_001) for hi in (0, 1)] == [1 << 16, 34_465]
    assert [_low_size(hi, 131_073) for hi in (0, 1, 2)] == [1 << 16, 1 << 16, 1]
    assert _low_size(3, 1 << 18) == 1 << 16  # a size that is a multiple of 2**16
    assert [_low_size(hi, 131_071) for hi in (0, 1)] == [1 << 16, 65_535]  # one short of 2**17


def test_symbols_are_in_range_and_in_decoding_order():
    symbols = _count_symbols([100, 0, 1 << 20], [37, 0, 300_000])
    assert [(s, size) for s, size, _ in symbols] == [
        (6, 7), (5, 19), (0, 2),  # bucket 0: L, mantissa, flag (ones are the minority)
        (19, 21), (0, 4), (300_000 - (1 << 18), 1 << 16), (0, 2)]  # bucket 2 (bucket 1 is empty)
    assert all(0 <= s < size for s, size, _ in symbols)
    for _, size, probs in symbols:
        assert probs is None or (len(probs) == size and probs.sum() == pytest.approx(1.0))


def _round_trip(sizes, counts):
    coder = constriction.stream.stack.AnsCoder()
    _encode_counts(coder, sizes, counts)
    words = coder.get_compressed()
    decoder = constriction.stream.stack.AnsCoder(words)
    out = _decode_counts(decoder, sizes)
    return out, decoder.is_empty(), words.size


def test_counts_round_trip_and_end_the_stream():
    rng = np.random.default_rng(0)
    cases = [([0], [0]), ([1], [0]), ([1], [1]), ([2], [1]), ([3], [2]), ([1 << 20], [300_000]),
             ([(1 << 17) + 3], [(1 << 16) + 1]), ([1 << 18, 5, 0, 9], [1 << 17, 5, 0, 0]),
             ([724_288], [362_000]), ([724_288], [362_143]), ([786_432], [393_216]), ([786_432], [393_215]),
             ([786_432], [262_144 + (1 << 17) - 1])]
    for _ in range(200):
        sizes = rng.integers(0, 5000, size=int(rng.integers(1, 17))).tolist()
        counts = [int(rng.integers(0, n + 1)) for n in sizes]
        cases.append((sizes, counts))
    for sizes, counts in cases:
        out, empty, _ = _round_trip(sizes, counts)
        assert out == counts and empty, (sizes, counts)


def test_all_zero_buckets_cost_no_words():
    # every model's first symbol is free while the coder's state is 0: an all-zero mask's counts
    # take no words (what makes an unchanged cascade expert tensor a 1-byte payload)
    assert _round_trip([8, 100], [0, 0]) == ([0, 0], True, 0)
    assert _round_trip([8], [8])[2] == 1  # all ones: the flag 1 takes a word
