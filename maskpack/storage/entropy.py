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

Payload: ``u8 log2(B)`` | ``B`` LEB128 varints ``c_b`` | ANS words (uint32, little-endian).
Decoding costs a context pass and a stable counting sort of the contexts, plus symbols for the
minority entries only.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodecError

MAX_LOG2_BUCKETS = 4  # 16 buckets
SAMPLE = 16384
KCAP = 4096
ESCAPE = 64
_LN2_NUM, _LN2_DEN = 693147, 1_000_000


# ----------------------------------------------------------------------------------- varints


def _put_varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


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


def _varint_len(value: int) -> int:
    return max(1, (int(value).bit_length() + 6) // 7)


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
        cost = _entropy_bits(n, c) + 8 * sum(_varint_len(x) for x in c) + (32 if mixed.any() else 0)
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
    out = bytearray([lb])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    jobs = []
    for b, n_b in enumerate(sizes.tolist()):
        part = seq[starts[b]:starts[b + 1]]
        ones = int(np.count_nonzero(part))
        _put_varint(out, ones)
        m = min(ones, n_b - ones)
        if m == 0:
            continue
        minority = ones <= n_b - ones
        ranks = np.flatnonzero(part == minority)
        gaps = np.diff(ranks, prepend=-1) - 1
        k, _ = _gap_params(n_b, m)
        jobs.append((n_b, m, k, gaps // k, gaps % k))
    if not jobs:
        return bytes(out)
    coder = constriction.stream.stack.AnsCoder()
    for n_b, m, k, q, r in reversed(jobs):  # a stack: encode in reverse decoding order
        model_r, model_q = _models(n_b, m, k)
        if model_r is not None:
            coder.encode_reverse(r.astype(np.int32), model_r)
        for rnd in reversed(_escape_rounds(q)):
            coder.encode_reverse(rnd, model_q)
    words = coder.get_compressed().astype("<u4", copy=False)
    return bytes(out) + words.tobytes()


# ---------------------------------------------------------------------------------- decoding


def _read_counts(payload: bytes, n: int) -> tuple[int, list[int], int]:
    if not payload:
        raise CodecError("ans payload is empty")
    lb = payload[0]
    if lb > MAX_LOG2_BUCKETS:
        raise CodecError(f"ans payload declares {1 << min(lb, 30)} buckets; at most 16 are allowed")
    pos, counts = 1, []
    for _ in range(1 << lb):
        c, pos = _get_varint(payload, pos)
        counts.append(c)
    if (len(payload) - pos) % 4:
        raise CodecError("ans payload's coded part is not a whole number of 32-bit words")
    return lb, counts, pos


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

    lb, counts, pos = _read_counts(payload, numel)
    order, sizes = (None, np.array([numel])) if lb == 0 else _check_absw(absw, numel).order(lb)
    sizes = sizes.tolist()
    minors = []
    for b, (c, n_b) in enumerate(zip(counts, sizes, strict=True)):
        if c > n_b:
            raise CodecError(f"ans bucket {b} claims {c} ones but holds {n_b} elements")
        minors.append(min(c, n_b - c))
    words = np.frombuffer(payload, dtype="<u4", offset=pos).astype(np.uint32)
    # No bound from the payload size: the stack coder keeps its most probable symbol for free
    # while its state is small, so a bucket whose minority entries come first codes to no words
    # at all. The work is bounded by the element count (c <= n_b above; callers check numel).
    if words.size and not sum(minors):
        raise CodecError("ans payload has coded data but its bucket counts need none")
    # Fill with the most common majority, then fix up buckets with the other majority and minorities.
    maj = [c > n_b - c for c, n_b in zip(counts, sizes, strict=True)]
    fill = sum(n_b for mj, n_b in zip(maj, sizes, strict=True) if mj) * 2 >= numel
    out = np.full(numel, fill, dtype=bool)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
    except Exception as exc:
        raise CodecError(f"ans payload is not valid coded data: {exc}") from exc
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
    return out
