"""``ans``: the backbone-conditioned entropy coder for masks.

Why it works: a score's gradient is proportional to its weight's magnitude, so whether a weight
is switched off depends strongly on ``|W|``. The decoder holds the verified backbone, so it can
compute the same contexts as the encoder; only per-context counts are sent.

Model, per masked tensor of ``n`` elements (flattened in C order):

* Contexts: ``B`` buckets (``B`` in 1, 2, 4, 8, 16, chosen by the encoder to minimise the total
  size) of ``|W|``. The ``B - 1`` thresholds are quantiles of a strided sample
  (``absw[::max(1, n // 16384)]``, sorted) at ``floor(j * len / B)``; an element's bucket is the
  number of thresholds ``<= |w|``. Ties in ``|W|`` may leave some buckets empty: that is fine.
* Within bucket ``b`` (elements in position order) the count of ones ``c_b`` is sent; the
  minority symbol (ones when ``c_b <= n_b - c_b``) occurs ``m_b`` times with ``p = m_b / n_b``.
* Only the gaps ``g`` (runs of the majority symbol before each minority symbol) are coded, with
  the geometric model ``P(g) = (1-p)^g p``, split Golomb-style into ``g = q*K + r``:
  ``r`` in ``0..K-1`` with ``P(r) ~ (1-p)^r`` and ``q`` with ``P(q) ~ rho^q``,
  ``rho = (1-p)^K``. ``K = max(1, min(4096, floor(0.693147 * n_b / m_b)))`` (integer arithmetic)
  makes ``rho`` about 1/2. ``q`` uses the alphabet ``0..64`` where 64 is an escape meaning
  "64 more, read another q" (the geometric law is memoryless, so the escape costs nothing extra).
  Both models are built with IEEE arithmetic only (division and ``np.cumprod``), so every
  platform builds bit-identical tables.
* The coder is constriction's stack ANS with ``Categorical(perfect=False)`` models. Buckets are
  decoded in order; per bucket: the q escape rounds, then the ``r`` values.

Payload: ``u8 (layout << 4) | log2(B)`` then, by layout:

* layout 1 (written since format version 2): ANS words only (uint32, little-endian). The stream
  holds the bucket counts first, in bucket order, then the gaps. Per non-empty bucket: the
  minority count ``m = min(c, n - c)`` (at most ``h = n // 2``) as its bit length ``L`` in
  ``0..bitlen(h)`` (model ``P(L) ~ 2^-|L - L_prev|``, ``L_prev`` the previous non-empty bucket's
  ``L``, uniform for the first), then for ``L >= 2`` the value ``m - 2^(L-1)`` uniform over
  ``min(2^(L-1), h - 2^(L-1) + 1)`` values (in 16-bit pieces, high piece first); then, when
  ``2m < n``, a flag "ones are the majority" (``P = 7/8`` that it equals the previous flag, 1/2
  for the first). The stream must end exactly after the last bucket's gaps.
* layout 0 (format version 1): ``B`` LEB128 varints ``c_b``, then ANS words with the gaps only.

Decoding costs a context pass and a stable counting sort of the contexts, plus symbols for the
minority entries only.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError

MAX_LOG2_BUCKETS = 4  # 16 buckets
LAYOUT = 1  # what encode_mask writes: the bucket counts inside the ANS stream
PIECE = 16  # uniform values are coded in pieces of at most 2**16 values
SAME_FLAG = 7 / 8
SAMPLE = 16384
KCAP = 4096
ESCAPE = 64
_LN2_NUM, _LN2_DEN = 693147, 1_000_000


# ----------------------------------------------------------------------------------- varints


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for i in range(10):
        if pos + i >= len(data):
            raise CodecError("ans payload is truncated inside its bucket counts")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos + i + 1
    raise CodecError("ans payload has a malformed bucket count")


# ------------------------------------------------------------------------ counts (layout 1)


def _length_probs(lmax: int, prev: int | None) -> np.ndarray:
    """P(L) over ``0..lmax``: ``2^-|L - prev|`` normalised (uniform without a previous bucket)."""
    ls = np.arange(lmax + 1)
    # ldexp: exact powers of two (and an exact sum) on every platform, so every decoder builds
    # the same table
    p = np.ones(lmax + 1) if prev is None else np.ldexp(1.0, -np.abs(ls - min(prev, lmax)))
    return p / p.sum()


def _flag_probs(prev: int | None) -> np.ndarray:
    """P(flag) over 0, 1: 1/2 each for the first flag, then SAME_FLAG for the previous one."""
    if prev is None:
        return np.array([0.5, 0.5])
    return np.array([SAME_FLAG, 1 - SAME_FLAG] if prev == 0 else [1 - SAME_FLAG, SAME_FLAG])


def _mantissa(length: int, half: int) -> tuple[int, int]:
    """(``2^(L-1)``, how many values ``m - 2^(L-1)`` can take) for a minority count ``m`` of bit
    length ``L >= 2`` in a bucket whose minority holds at most ``half`` entries."""
    low = 1 << (length - 1)
    return low, min(low, half - low + 1)


def _high_size(size: int) -> int:
    """Values of the high piece of a uniform value in ``0..size-1`` (``size`` > 2**PIECE)."""
    return ((size - 1) >> PIECE) + 1


def _low_size(hi: int, size: int) -> int:
    """Values of the low piece of a uniform value in ``0..size-1`` whose high piece is ``hi``."""
    return (1 << PIECE) if hi < (size - 1) >> PIECE else ((size - 1) & ((1 << PIECE) - 1)) + 1


def _count_symbols(sizes, counts) -> list[tuple[int, int, np.ndarray | None]]:
    """Layout 1's counts as (symbol, alphabet size, probabilities or None: uniform), in decoding
    order (the module docstring)."""
    out: list[tuple[int, int, np.ndarray | None]] = []
    prev_l = prev_f = None
    for n_b, c in zip(sizes, counts, strict=True):
        n_b, c = int(n_b), int(c)
        if n_b == 0:
            continue
        m, half = min(c, n_b - c), n_b // 2
        length = m.bit_length()
        out.append((length, half.bit_length() + 1, _length_probs(half.bit_length(), prev_l)))
        if length >= 2:
            low, size = _mantissa(length, half)
            value = m - low
            if size <= 1 << PIECE:
                out.append((value, size, None))
            else:  # high piece, then low piece
                hi = value >> PIECE
                out += [(hi, _high_size(size), None),
                        (value & ((1 << PIECE) - 1), _low_size(hi, size), None)]
        if 2 * m < n_b:
            out.append((int(c > n_b - c), 2, _flag_probs(prev_f)))
            prev_f = out[-1][0]
        prev_l = length
    return out


def _count_bits(sizes, counts) -> float:
    """The ideal bits layout 1 spends on these bucket counts (for the encoder's bucket choice)."""
    return float(sum(np.log2(size) if probs is None else -np.log2(probs[sym])
                     for sym, size, probs in _count_symbols(sizes, counts)))


def _model(size: int, probs: np.ndarray | None):
    import constriction

    m = constriction.stream.model
    return m.Uniform(size) if probs is None else m.Categorical(probs, perfect=False)


def _encode_counts(coder, sizes, counts) -> None:
    """Push the counts so that they decode first, in bucket order (a stack: reverse order)."""
    for sym, size, probs in reversed(_count_symbols(sizes, counts)):
        if size > 1:  # a one-value alphabet costs nothing and is not coded
            coder.encode_reverse(np.array([sym], dtype=np.int32), _model(size, probs))


def _decode_counts(coder, sizes) -> list[int]:
    """Inverse of :func:`_encode_counts`: every decoded value is in range by construction."""

    def read(size: int, probs: np.ndarray | None = None) -> int:
        return int(coder.decode(_model(size, probs), 1)[0]) if size > 1 else 0

    counts, prev_l, prev_f = [], None, None
    for n_b in (int(x) for x in sizes):
        if n_b == 0:
            counts.append(0)
            continue
        half = n_b // 2
        length = m = read(half.bit_length() + 1, _length_probs(half.bit_length(), prev_l))
        if length >= 2:
            low, size = _mantissa(length, half)
            if size <= 1 << PIECE:
                m = low + read(size)
            else:
                hi = read(_high_size(size))
                m = low + (hi << PIECE) + read(_low_size(hi, size))
        flag = 0
        if 2 * m < n_b:
            flag = prev_f = read(2, _flag_probs(prev_f))
        prev_l = length
        counts.append(n_b - m if flag else m)
    return counts


# ---------------------------------------------------------------------------------- contexts


def thresholds(absw: np.ndarray, n_buckets: int) -> np.ndarray:
    """The ``n_buckets - 1`` bucket thresholds of a flat |W| array (deterministic)."""
    if n_buckets <= 1 or absw.size == 0:
        return np.empty(0, dtype=np.float32)
    sample = np.sort(absw[:: max(1, absw.size // SAMPLE)])
    return sample[(np.arange(1, n_buckets) * sample.size) // n_buckets]


def contexts(absw: np.ndarray, n_buckets: int) -> np.ndarray:
    """Bucket id (uint8) of every element: the number of thresholds ``<= |w|``."""
    ctx = np.zeros(absw.size, dtype=np.uint8)
    hit = np.empty(absw.size, dtype=bool)  # reused: no temporary array per threshold
    for t in thresholds(absw, n_buckets):
        np.greater_equal(absw, t, out=hit)
        ctx += hit.view(np.uint8)
    return ctx


class TensorContexts:
    """|W| of one backbone tensor plus its bucket orders, each computed once.

    Decoding is dominated by the context pass and the stable sort of contexts; a loader that
    decodes many masks over one backbone keeps these objects (see :mod:`maskpack.io`).
    """

    def __init__(self, absw: np.ndarray):
        self.absw = np.ascontiguousarray(absw, dtype=np.float32).reshape(-1)
        self._orders: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}

    @property
    def size(self) -> int:
        return self.absw.size

    def order(self, lb: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(stable order of positions by bucket or None for one bucket, bucket sizes) for 2**lb buckets."""
        if lb not in self._orders:
            if lb == 0:
                self._orders[lb] = None, np.array([self.size], dtype=np.int64)
            else:
                ctx = contexts(self.absw, 1 << lb)
                self._orders[lb] = np.argsort(ctx, kind="stable"), np.bincount(ctx, minlength=1 << lb)
        return self._orders[lb]


def _check_absw(absw, n: int) -> TensorContexts:
    if absw is None:
        raise CodecError("the ans codec needs the backbone's weights to decode: pass the backbone")
    ctxs = absw if isinstance(absw, TensorContexts) else TensorContexts(absw)
    if ctxs.size != n:
        raise CodecError(f"backbone weight has {ctxs.size} elements but the mask has {n}")
    return ctxs


# ------------------------------------------------------------------------------------ models


def _gap_params(n_b: int, m: int) -> tuple[int, int]:
    """(K, q_max): Golomb parameter and the largest possible quotient."""
    k = max(1, min(KCAP, (_LN2_NUM * n_b) // (_LN2_DEN * m)))
    return k, (n_b - m) // k


def _models(n_b: int, m: int, k: int):
    import constriction

    cat = constriction.stream.model.Categorical
    a = (n_b - m) / n_b  # 1 - p
    pr = np.ones(k + 1)
    pr[1:] = np.cumprod(np.full(k, a))
    rho = pr[k]  # (1-p)^K
    pq = np.ones(ESCAPE + 1)
    pq[1:] = np.cumprod(np.full(ESCAPE, rho))
    pq[:ESCAPE] *= 1.0 - rho  # P(q) = rho^q (1 - rho) for q < 64; P(escape) = rho^64
    model_r = cat(pr[:k], perfect=False) if k > 1 else None
    model_q = cat(pq, perfect=False)
    return model_r, model_q


def _entropy_bits(n: np.ndarray, c: np.ndarray) -> float:
    n = n.astype(np.float64)
    c = c.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(n > 0, c / np.maximum(n, 1), 0.0)
        h = -(p * np.log2(np.where(p > 0, p, 1)) + (1 - p) * np.log2(np.where(p < 1, 1 - p, 1)))
    return float((n * h).sum())


def conditional_entropy_bits(mask: np.ndarray, absw: np.ndarray, n_buckets: int = 16) -> float:
    """The empirical entropy (bits) of ``mask`` given ``n_buckets`` |W| buckets: the ideal size."""
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    ctx = contexts(_check_absw(absw, flat.size).absw, n_buckets)
    n = np.bincount(ctx, minlength=n_buckets)
    c = np.bincount(ctx, weights=flat, minlength=n_buckets).astype(np.int64)
    return _entropy_bits(n, c)


def _choose_buckets(flat: np.ndarray, ctxs: TensorContexts | None) -> int:
    """log2 of the bucket count that minimises entropy + count bytes."""
    if ctxs is None or flat.size < 64:
        return 0
    top = 1 << MAX_LOG2_BUCKETS
    ctx = contexts(ctxs.absw, top)
    n16 = np.bincount(ctx, minlength=top)
    c16 = np.bincount(ctx, weights=flat, minlength=top).astype(np.int64)
    best, best_cost = 0, None
    for lb in range(MAX_LOG2_BUCKETS + 1):
        group = top >> lb
        n = n16.reshape(-1, group).sum(1)
        c = c16.reshape(-1, group).sum(1)
        mixed = (c > 0) & (c < n)
        cost = _entropy_bits(n, c) + _count_bits(n, c) + (32 if mixed.any() else 0)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = lb, cost
    return best


# ---------------------------------------------------------------------------------- encoding


def _escape_rounds(q: np.ndarray) -> list[np.ndarray]:
    rounds = []
    rest = q
    while rest.size:
        rounds.append(np.minimum(rest, ESCAPE).astype(np.int32))
        rest = rest[rest >= ESCAPE] - ESCAPE
    return rounds


def encode_mask(mask: np.ndarray, absw: np.ndarray | TensorContexts | None) -> bytes:
    """Encode a bool mask; ``absw`` is the flat |W| of the backbone tensor (None: one bucket)."""
    import constriction

    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    n = flat.size
    ctxs = None if absw is None else _check_absw(absw, n)
    lb = _choose_buckets(flat, ctxs)
    order, sizes = (None, np.array([n])) if lb == 0 else ctxs.order(lb)
    seq = flat if order is None else flat[order]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    counts, jobs = [], []
    for b, n_b in enumerate(sizes.tolist()):
        part = seq[starts[b]:starts[b + 1]]
        ones = int(np.count_nonzero(part))
        counts.append(ones)
        m = min(ones, n_b - ones)
        if m == 0:
            continue
        minority = ones <= n_b - ones
        ranks = np.flatnonzero(part == minority)
        gaps = np.diff(ranks, prepend=-1) - 1
        k, _ = _gap_params(n_b, m)
        jobs.append((n_b, m, k, gaps // k, gaps % k))
    coder = constriction.stream.stack.AnsCoder()
    for n_b, m, k, q, r in reversed(jobs):  # a stack: encode in reverse decoding order
        model_r, model_q = _models(n_b, m, k)
        if model_r is not None:
            coder.encode_reverse(r.astype(np.int32), model_r)
        for rnd in reversed(_escape_rounds(q)):
            coder.encode_reverse(rnd, model_q)
    _encode_counts(coder, sizes.tolist(), counts)  # pushed last: decoded first
    words = coder.get_compressed().astype("<u4", copy=False)
    return bytes([(LAYOUT << 4) | lb]) + words.tobytes()


# ---------------------------------------------------------------------------------- decoding


def _read_prefix(payload: bytes) -> tuple[int, int, list[int] | None, int]:
    """(layout, log2 of the bucket count, layout 0's counts or None, where the words start)."""
    if not payload:
        raise CodecError("ans payload is empty")
    layout, lb = payload[0] >> 4, payload[0] & 0x0F
    if layout > LAYOUT:
        raise CodecError(f"ans payload has layout {layout}; this maskpack reads layouts 0 and {LAYOUT}: "
                         "upgrade maskpack")
    if lb > MAX_LOG2_BUCKETS:
        raise CodecError(f"ans payload declares {1 << lb} buckets; at most 16 are allowed")
    pos, counts = 1, None
    if layout == 0:
        counts = []
        for _ in range(1 << lb):
            c, pos = _get_varint(payload, pos)
            counts.append(c)
    if (len(payload) - pos) % 4:
        raise CodecError("ans payload's coded part is not a whole number of 32-bit words")
    return layout, lb, counts, pos


def _decode_gaps(coder, n_b: int, m: int) -> np.ndarray:
    """Minority ranks within one bucket."""
    k, q_max = _gap_params(n_b, m)
    model_r, model_q = _models(n_b, m, k)
    q = coder.decode(model_q, m).astype(np.int64)
    idx = np.flatnonzero(q == ESCAPE)
    while idx.size:
        if int(q[idx].max()) > q_max:
            raise CodecError("ans payload decodes to a run longer than its bucket")
        more = coder.decode(model_q, idx.size)
        q[idx] += more
        idx = idx[more == ESCAPE]
    r = coder.decode(model_r, m).astype(np.int64) if model_r is not None else 0
    ranks = np.cumsum(q * k + r + 1) - 1
    if ranks[-1] >= n_b:
        raise CodecError("ans payload decodes to positions past the end of its bucket")
    return ranks


def decode_mask(payload: bytes, numel: int, absw: np.ndarray | TensorContexts | None) -> np.ndarray:
    """Decode a flat bool mask of ``numel`` elements; CodecError on any inconsistency."""
    import constriction

    layout, lb, counts, pos = _read_prefix(payload)
    if layout and lb and pos == len(payload):
        # An empty stream decodes to an all-zero mask (each model's first symbol, state 0), which
        # the encoder codes with one bucket: with more it is a cut or forged payload.
        raise CodecError(f"ans payload has no coded data for its {1 << lb} buckets")
    order, sizes = (None, np.array([numel])) if lb == 0 else _check_absw(absw, numel).order(lb)
    sizes = sizes.tolist()
    words = np.frombuffer(payload, dtype="<u4", offset=pos).astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        counts = _decode_counts(coder, sizes) if counts is None else counts
    except Exception as exc:
        raise CodecError(f"ans payload is not valid coded data: {exc}") from exc
    minors = []
    for b, (c, n_b) in enumerate(zip(counts, sizes, strict=True)):
        if c > n_b:
            raise CodecError(f"ans bucket {b} claims {c} ones but holds {n_b} elements")
        minors.append(min(c, n_b - c))
    # No bound from the payload size: the stack coder keeps its most probable symbol for free
    # while its state is small, so a bucket whose minority entries come first codes to no words
    # at all. The work is bounded by the element count (c <= n_b above; callers check numel).
    if layout == 0 and words.size and not sum(minors):
        raise CodecError("ans payload has coded data but its bucket counts need none")
    # Fill with the most common majority, then fix up buckets with the other majority and minorities.
    maj = [c > n_b - c for c, n_b in zip(counts, sizes, strict=True)]
    fill = sum(n_b for mj, n_b in zip(maj, sizes, strict=True) if mj) * 2 >= numel
    out = np.full(numel, fill, dtype=bool)
    start = 0
    for b, n_b in enumerate(sizes):
        sel = slice(start, start + n_b)
        start += n_b
        if maj[b] != fill:
            out[sel if order is None else order[sel]] = maj[b]
        if not minors[b]:
            continue
        try:
            ranks = _decode_gaps(coder, n_b, minors[b])
        except CodecError:
            raise
        except Exception as exc:
            raise CodecError(f"ans payload does not decode: {type(exc).__name__}: {exc}") from exc
        pos_b = ranks + sel.start
        out[pos_b if order is None else order[pos_b]] = not maj[b]
    if layout and not coder.is_empty():  # a layout-1 stream ends with its last symbol
        raise CodecError("ans payload has coded data after its last symbol")
    return out
