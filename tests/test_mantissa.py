"""round_mantissa: values with fewer mantissa bits, rounded to nearest with ties to even."""

import pytest
import torch

from maskpack.errors import ConfigError
from maskpack.extras import round_mantissa


def test_rounds_to_nearest_with_ties_to_even():
    x = torch.tensor([1.0, 1.1, -1.1, 1.0625, 1.1875, 1.1874, 0.0, -0.0, 3.0, 1e-40])
    # 3 bits: steps of 1/8 in [1, 2); 1.0625 and 1.1875 are ties (to 1.0 and 1.25, the even ones)
    assert round_mantissa(x, 3).tolist() == [1.0, 1.125, -1.125, 1.0, 1.25, 1.125, 0.0, -0.0, 3.0, 0.0]
    assert round_mantissa(torch.tensor([1.5, 1.75]), 1).tolist() == [1.5, 2.0]  # 1.75: a tie, up to even
    assert round_mantissa(torch.tensor([1.5]), 0).tolist() == [2.0]  # a tie at 0 bits: to 2 (even)


def test_relative_error_bound_and_idempotence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.exp(torch.randn(10_000, generator=g) * 4)
    for bits in (1, 4, 7, 10, 22):
        r = round_mantissa(x, bits)
        assert r.dtype == torch.float32
        assert ((r - x).abs() <= x.abs() * 2.0 ** -(bits + 1)).all()
        assert torch.equal(round_mantissa(r, bits), r)
        assert not (r.view(torch.int32) & ((1 << (23 - bits)) - 1)).any()
    assert torch.equal(round_mantissa(x, 23), x)
    # exact in the narrower dtypes (normal range)
    y = x[(x.abs() > 1e-3) & (x.abs() < 6e4)]
    assert torch.equal(round_mantissa(y, 7).to(torch.bfloat16).float(), round_mantissa(y, 7))
    assert torch.equal(round_mantissa(y, 10).to(torch.float16).float(), round_mantissa(y, 10))


def test_refuses_bad_bits_and_overflow():
    for bits in (-1, 24, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="mantissa bits must be an integer in 0..23"):
            round_mantissa(torch.ones(2), bits)
    with pytest.raises(ConfigError, match="overflows when rounded to 1 mantissa bits"):
        round_mantissa(torch.tensor([3.4e38]), 1)
    assert torch.isinf(round_mantissa(torch.tensor([float("inf")]), 3)).all()  # inf in, inf out
