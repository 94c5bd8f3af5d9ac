"""Storage comparison: a task's binary masks against the fine-tuned fp32 weights of the same tensors.

The paper's Appendix C compresses the bit-packed masks and the fine-tuned fp32 weights with
general-purpose codecs. This module does the same and adds the strongest lossless fp32
baselines we know of, so the comparison is honest:

* ``bytegroup+zstd-19``: split the fp32 stream into its 4 byte planes and compress each with
  zstd -19 (the ZipNN idea: the exponent bytes are very compressible, the mantissa bytes are not);
* ``xor+zstd-19`` and ``xor+bytegroup+zstd-19``: XOR the fine-tuned bits with the backbone's bits
  first (the decoder has the backbone, as it has for the masks), so unchanged sign, exponent and
  high mantissa bits become zeros.

Every method is checked to round-trip exactly; sizes, reductions and encode/decode speeds come
back as :class:`Row` objects inside a :class:`BenchResult` (``to_dict()`` for JSON). Two headline
ratios, both over the same tensors on both sides (the paper's definition):

* ``paper``: lzma -9 on both sides (the paper: up to 79x);
* ``honest``: the best method on each side (the ``ans`` mask coder against the best fp32 method).

The whole-checkpoint ratio also counts what else a task needs: the fine-tune's other tensors
(BatchNorm weights and statistics, the head), compressed with the same method, against the
``.mask`` file as :func:`maskpack.save` writes it (masks, head and BN statistics, header).

Example:
    >>> from maskpack import bench
    >>> result = bench.compare_files("runs/m/task.mask", "runs/f/model.safetensors")  # doctest: +SKIP
    >>> result.ratios["honest"]                                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BackboneMismatchError, ConfigError, FormatError
from .storage import bits
from .storage.codecs import get_codec

Progress = Callable[[str], None] | None

# (row name, registry codec, level): the general codecs used on both sides.
GENERAL: tuple[tuple[str, str, int | None], ...] = (
    ("gzip-9", "gzip", 9), ("bz2-9", "bz2", 9), ("lzma-9", "lzma", 9), ("lz4", "lz4", None),
    ("snappy", "snappy", None), ("zstd-3", "zstd", 3), ("zstd-19", "zstd", 19),
)
# The fp32 methods run by default. ``xor+zstd-19`` (XOR delta, no byte grouping) is available but
# left out: it is the slowest method and never the best (byte grouping after the XOR always wins).
FP32_DEFAULT = ("raw", *(n for n, _, _ in GENERAL), "bytegroup+zstd-19", "xor+bytegroup+zstd-19")
MASK_CODEC = "ans"
PAPER_CODEC = "lzma-9"


# ----------------------------------------------------------------------------- rows and results


@dataclass
class Row:
    """One method on one side.

    Attributes:
        side: ``"mask"`` (bit-packed masks) or ``"fp32"`` (fine-tuned weights).
        method: ``raw``, a general codec (``lzma-9`` ...), ``ans``, or an fp32 method.
        raw_bytes: input size (packed bits: 1 bit a weight; fp32: 4 bytes a weight).
        compressed_bytes: output size.
        encode_s, decode_s: wall time of one encode and one decode (0 for ``raw``).
    """

    side: str
    method: str
    raw_bytes: int
    compressed_bytes: int
    encode_s: float = 0.0
    decode_s: float = 0.0

    @property
    def reduction(self) -> float:
        """Saving relative to the raw size, in percent (negative when the output is larger)."""
        return 100.0 * (1.0 - self.compressed_bytes / self.raw_bytes) if self.raw_bytes else 0.0

    @property
    def encode_mbps(self) -> float | None:
        """Input megabytes (1e6) encoded per second, or None for ``raw``."""
        return self.raw_bytes / 1e6 / self.encode_s if self.encode_s > 0 else None

    @property
    def decode_mbps(self) -> float | None:
        """Input megabytes (1e6) restored per second, or None for ``raw``."""
        return self.raw_bytes / 1e6 / self.decode_s if self.decode_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {"side": self.side, "method": self.method, "raw_bytes": self.raw_bytes,
                "compressed_bytes": self.compressed_bytes, "reduction_pct": round(self.reduction, 3),
                "encode_s": self.encode_s, "decode_s": self.decode_s,
                "encode_mbps": self.encode_mbps, "decode_mbps": self.decode_mbps}


@dataclass
class BenchResult:
    """Everything ``maskpack bench`` prints; ``to_dict()`` is the ``--json`` file.

    Attributes:
        backbone: backbone name; tensors / numel: how many tensors and weights are masked.
        active: fraction of mask entries kept; changed: fraction of those weights the fine-tune changed.
        mask_rows, fp32_rows: one :class:`Row` per method (backbone-only: the masked tensors).
        whole: whole-checkpoint sizes (``mask_file_bytes``, ``fft_raw_bytes``, ``fft_best_bytes``,
            ``fft_best_method`` ...).
        ratios: ``paper``, ``honest``, ``whole`` (and ``whole_paper``), fp32 size / mask size.
        accuracy: ``{"mask": float | None, "fft": float | None}``.
        info: free-form provenance (dataset, epochs, file paths, timings).
    """

    backbone: str
    tensors: int
    numel: int
    active: float
    changed: float
    mask_rows: list[Row]
    fp32_rows: list[Row]
    whole: dict[str, Any]
    ratios: dict[str, float]
    accuracy: dict[str, float | None] = field(default_factory=lambda: {"mask": None, "fft": None})
    info: dict[str, Any] = field(default_factory=dict)

    def row(self, side: str, method: str) -> Row:
        """The row of ``method`` on ``side``; KeyError when absent."""
        for r in self.mask_rows if side == "mask" else self.fp32_rows:
            if r.method == method:
                return r
        raise KeyError(f"{side}/{method}")

    def best(self, side: str) -> Row:
        """The smallest row of a side (``raw`` included: storing uncompressed is a choice too)."""
        return min(self.mask_rows if side == "mask" else self.fp32_rows, key=lambda r: r.compressed_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "tensors": self.tensors, "numel": self.numel,
                "active": self.active, "changed": self.changed,
                "mask": [r.to_dict() for r in self.mask_rows], "fp32": [r.to_dict() for r in self.fp32_rows],
                "whole": self.whole, "ratios": self.ratios, "accuracy": self.accuracy, "info": self.info}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """Rebuild a result from :meth:`to_dict` output (e.g. a ``--json`` file, to re-plot it)."""
        keys = ("side", "method", "raw_bytes", "compressed_bytes", "encode_s", "decode_s")
        rows = {side: [Row(**{k: r[k] for k in keys}) for r in d[side]] for side in ("mask", "fp32")}
        return cls(d["backbone"], d["tensors"], d["numel"], d["active"], d["changed"], rows["mask"],
                   rows["fp32"], d["whole"], d["ratios"], d.get("accuracy", {}), d.get("info", {}))


# ----------------------------------------------------------------------------- fp32 methods


def byte_group(data: bytes) -> list[bytes]:
    """Split a little-endian 4-byte-word stream into its 4 byte planes (plane 3: sign + exponent)."""
    if len(data) % 4:
        raise ConfigError(f"byte grouping needs a multiple of 4 bytes, got {len(data)}")
    words = np.frombuffer(data, dtype=np.uint8).reshape(-1, 4)
    return [words[:, i].tobytes() for i in range(4)]


def byte_ungroup(planes: list[bytes]) -> bytes:
    """Inverse of :func:`byte_group`."""
    n = len(planes[0])
    if len(planes) != 4 or any(len(p) != n for p in planes):
        raise FormatError("byte planes must be 4 planes of equal length")
    out = np.empty((n, 4), dtype=np.uint8)
    for i, p in enumerate(planes):
        out[:, i] = np.frombuffer(p, dtype=np.uint8)
    return out.tobytes()


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """Bitwise XOR of two equally long byte strings (self-inverse: ``xor(xor(a, b), b) == a``)."""
    if len(a) != len(b):
        raise ConfigError(f"XOR needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) % 8 == 0:
        return (np.frombuffer(a, dtype=np.uint64) ^ np.frombuffer(b, dtype=np.uint64)).tobytes()
    return (np.frombuffer(a, dtype=np.uint8) ^ np.frombuffer(b, dtype=np.uint8)).tobytes()


def _general_encode(codec: str, level: int | None, data: bytes) -> bytes:
    c = get_codec(codec)
    return data if c._encode is None else c._encode(data, c.check_level(level))


def _general_decode(codec: str, payload: bytes, size: int) -> bytes:
    c = get_codec(codec)
    if c._decode is None:
        return payload
    if codec == "lz4" and size == 0:
        return b""
    return c._decode(payload, size)


def _grouped_encode(data: bytes) -> bytes:
    # Frame: 4 little-endian uint32 plane lengths, then the 4 zstd frames.
    parts = [_general_encode("zstd", 19, p) for p in byte_group(data)]
    return struct.pack("<4I", *(len(p) for p in parts)) + b"".join(parts)


def _grouped_decode(payload: bytes, size: int) -> bytes:
    if len(payload) < 16:
        raise FormatError("byte-grouped payload is shorter than its 16-byte frame header")
    lengths = struct.unpack_from("<4I", payload)
    if 16 + sum(lengths) != len(payload):
        raise FormatError("byte-grouped payload's plane lengths do not add up to its size")
    planes, pos = [], 16
    for n in lengths:
        planes.append(_general_decode("zstd", payload[pos:pos + n], size // 4))
        pos += n
    return byte_ungroup(planes)


def fp32_methods() -> dict[str, tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes, int], bytes]]]:
    """``{name: (encode(data, base), decode(payload, base, size))}`` for every fp32 method.

    ``base`` is the backbone's bytes of the same tensors (only the ``xor+`` methods use it).
    """
    out: dict[str, Any] = {"raw": (lambda d, b: d, lambda p, b, n: p)}
    for name, codec, level in GENERAL:
        out[name] = (lambda d, b, c=codec, lv=level: _general_encode(c, lv, d),
                     lambda p, b, n, c=codec: _general_decode(c, p, n))
    out["bytegroup+zstd-19"] = (lambda d, b: _grouped_encode(d), lambda p, b, n: _grouped_decode(p, n))
    out["xor+zstd-19"] = (lambda d, b: _general_encode("zstd", 19, xor_bytes(d, b)),
                          lambda p, b, n: xor_bytes(_general_decode("zstd", p, n), b))
    out["xor+bytegroup+zstd-19"] = (lambda d, b: _grouped_encode(xor_bytes(d, b)),
                                    lambda p, b, n: xor_bytes(_grouped_decode(p, n), b))
    return out


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


Job = tuple[str, Callable[[], Any]]  # (progress label, work)


def default_workers() -> int:
    """Threads for the codec runs: one per CPU the process may use (the codecs release the GIL)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Rough relative cost of the slow methods on fp32 data: they start first when several run at once.
_SLOW = ("fp32 lzma-9", "fp32 bytegroup+zstd-19", "fp32 xor+bytegroup+zstd-19", "fp32 xor+zstd-19",
         "fp32 zstd-19", "fp32 bz2-9", "fp32 gzip-9")


def run_jobs(jobs: list[Job], *, workers: int = 1, progress: Progress = None,
             slow_first: bool = False) -> list[Any]:
    """Run ``jobs`` (``workers`` at a time), return their results in order; ``progress(label)`` is
    called as each finishes. With several workers the measured speeds include the contention."""
    if workers <= 1:
        out = []
        for label, fn in jobs:
            out.append(fn())
            if progress:
                progress(label)
        return out
    from concurrent.futures import ThreadPoolExecutor, as_completed

    order = list(range(len(jobs)))
    if slow_first:
        order.sort(key=lambda i: _SLOW.index(jobs[i][0]) if jobs[i][0] in _SLOW else len(_SLOW))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(jobs[i][1]): i for i in order}
        results: list[Any] = [None] * len(jobs)
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if progress:
                progress(jobs[i][0])
    return results


def _fp32_job(side: str, name: str, data: bytes, base: bytes) -> Row:
    from .errors import CodecError

    enc, dec = fp32_methods()[name]
    payload, t_enc = _timed(enc, data, base)
    restored, t_dec = _timed(dec, payload, base, len(data))
    if restored != data:
        raise CodecError(f"fp32 method {name!r} did not round-trip exactly")
    if name == "raw":
        t_enc = t_dec = 0.0
    return Row(side, name, len(data), len(payload), t_enc, t_dec)


def fp32_jobs(data: bytes, base: bytes, *, methods: list[str] | None = None,
              side: str = "fp32") -> list[Job]:
    """One job per fp32 method (default :data:`FP32_DEFAULT`); each returns a checked :class:`Row`."""
    if len(data) != len(base):
        raise ConfigError(f"fine-tuned and backbone streams differ in length ({len(data)} vs {len(base)})")
    known = fp32_methods()
    names = list(methods or FP32_DEFAULT)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown fp32 method {unknown[0]!r}: use one of {', '.join(known)}")
    return [(f"{side} {n}", lambda n=n: _fp32_job(side, n, data, base)) for n in names]


def fp32_rows(data: bytes, base: bytes, *, methods: list[str] | None = None, progress: Progress = None,
              side: str = "fp32", workers: int = 1) -> list[Row]:
    """Compress fp32 bytes with every method, checking each round-trips exactly.

    Args:
        data: the fine-tuned tensors' bytes (little-endian fp32, concatenated).
        base: the backbone's bytes of the same tensors (same length), for the ``xor+`` methods.
        methods: names from :func:`fp32_methods`, in order; default :data:`FP32_DEFAULT`.
        progress: called with a label as each method finishes.
        workers: methods run at once (threads).

    Raises:
        CodecError: a method does not restore the input (a bug, never expected).
    """
    return run_jobs(fp32_jobs(data, base, methods=methods, side=side), workers=workers, progress=progress)


# ----------------------------------------------------------------------------- mask rows


def _mask_general_job(name: str, codec: str, level: int | None, packed: bytes) -> Row:
    from .errors import CodecError

    payload, t_enc = _timed(_general_encode, codec, level, packed)
    restored, t_dec = _timed(_general_decode, codec, payload, len(packed))
    if restored != packed:
        raise CodecError(f"mask codec {name!r} did not round-trip exactly")
    return Row("mask", name, len(packed), len(payload), t_enc, t_dec)


def _mask_ans_job(masks: dict[str, np.ndarray], absw: dict[str, np.ndarray], raw: int) -> Row:
    from .errors import CodecError

    ans = get_codec(MASK_CODEC)
    size, t_enc, t_dec = 0, 0.0, 0.0
    for name, m in masks.items():
        payload, te = _timed(ans.encode, m, absw[name])
        restored, td = _timed(ans.decode, payload, m.size, absw[name])
        if not np.array_equal(restored, m):
            raise CodecError(f"ans did not round-trip mask {name!r}")
        size, t_enc, t_dec = size + len(payload), t_enc + te, t_dec + td
    return Row("mask", MASK_CODEC, raw, size, t_enc, t_dec)


def mask_jobs(masks: dict[str, np.ndarray], absw: dict[str, np.ndarray]) -> list[Job]:
    """One job per mask codec (``raw``, the general codecs, ``ans``); each returns a checked Row."""
    flat = np.concatenate([m.reshape(-1) for m in masks.values()]) if masks else np.zeros(0, bool)
    packed = bits.pack(flat)
    jobs: list[Job] = [("mask raw", lambda: Row("mask", "raw", len(packed), len(packed)))]
    jobs += [(f"mask {n}", lambda n=n, c=c, lv=lv: _mask_general_job(n, c, lv, packed))
             for n, c, lv in GENERAL]
    jobs.append((f"mask {MASK_CODEC}", lambda: _mask_ans_job(masks, absw, len(packed))))
    return jobs


def mask_rows(masks: dict[str, np.ndarray], absw: dict[str, np.ndarray], *,
              progress: Progress = None, workers: int = 1) -> list[Row]:
    """Compress the masks with every general codec (on the concatenated packed bits) and ``ans``.

    The general codecs see one bit-packed stream of all masks in order, as in the paper; ``ans``
    codes each tensor with its backbone weight magnitudes as contexts (what a ``.mask`` file
    holds), and its size is the sum of the tensors' payloads.

    Args:
        masks: ``{name: flat bool array}`` in backbone order.
        absw: ``{name: flat float32 |W|}`` of the backbone tensors.
        progress, workers: as for :func:`fp32_rows`.
    """
    return run_jobs(mask_jobs(masks, absw), workers=workers, progress=progress)


# ----------------------------------------------------------------------------- inputs


def _le_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes, little-endian, C order (fp32 weights stay fp32)."""
    arr = t.detach().to("cpu").contiguous().numpy()
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _fp32(name: str, t: torch.Tensor, where: str) -> torch.Tensor:
    if not t.is_floating_point():
        raise FormatError(f"{where}: tensor {name!r} is {t.dtype}, expected a floating-point weight")
    return t.detach().to("cpu", torch.float32)


def check_pair(masks: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], backbone_state: dict,
               *, where: str = "the fine-tune") -> None:
    """Raise a clear error unless the fine-tune's ``backbone.*`` tensors fit the masks and backbone.

    Raises:
        BackboneMismatchError: a masked tensor is missing from the fine-tune or has another shape,
            or the fine-tune holds tensors the backbone does not have.
    """
    for name, m in masks.items():
        key = f"backbone.{name}"
        if key not in finetuned:
            raise BackboneMismatchError(f"{where} has no tensor {key!r} for mask {name!r}: the mask and "
                                        "the fine-tune were made on different backbones")
        if tuple(finetuned[key].shape) != tuple(m.shape):
            raise BackboneMismatchError(f"{where}: {key!r} has shape {tuple(finetuned[key].shape)}, the mask "
                                        f"{tuple(m.shape)}: the mask and the fine-tune were made on "
                                        "different backbones")
    for key, t in finetuned.items():
        if not key.startswith("backbone."):
            continue
        ref = backbone_state.get(key.removeprefix("backbone."))
        if ref is None or tuple(ref.shape) != tuple(t.shape):
            raise BackboneMismatchError(f"{where}: tensor {key!r} does not fit the backbone "
                                        f"({'missing' if ref is None else tuple(ref.shape)}): the fine-tune "
                                        "was made on a different backbone")


def _backbone_state(backbone) -> dict[str, torch.Tensor]:
    module = getattr(backbone, "model", backbone)
    out = dict(module.named_buffers())
    out.update(module.named_parameters())
    return out


def compare(masks: dict[str, torch.Tensor], backbone, finetuned: dict[str, torch.Tensor], *,
            mask_extras: dict[str, torch.Tensor] | None = None, mask_metadata: dict[str, str] | None = None,
            accuracy: dict[str, float | None] | None = None, progress: Progress = None,
            info: dict[str, Any] | None = None, methods: list[str] | None = None,
            workers: int | None = None) -> BenchResult:
    """Compare the storage of a mask task and a full fine-tune on the same backbone.

    Args:
        masks: ``{backbone parameter name: BoolTensor}``.
        backbone: a :class:`maskpack.Backbone` (or ``nn.Module``) the masks were trained on.
        finetuned: the fine-tune's :class:`TaskModel` state dict (``backbone.*`` and ``head.*``).
        mask_extras, mask_metadata: what the mask task stores beside its masks (head, BN
            statistics), used for the whole-checkpoint size of the ``.mask`` file.
        accuracy: ``{"mask": ..., "fft": ...}`` to carry into the result.
        progress: called with a short label as each method finishes.
        methods: fp32 methods to run (default :data:`FP32_DEFAULT`; must include ``raw`` and ``lzma-9``).
        workers: methods run at once (default: one per CPU; 1 gives uncontended speeds).

    Returns:
        A :class:`BenchResult`.

    Raises:
        BackboneMismatchError: the fine-tune's tensors do not fit the masks or the backbone.
    """
    if not masks:
        raise ConfigError("no masks to compare: the task has no masked tensors")
    methods = list(methods or FP32_DEFAULT)
    if PAPER_CODEC not in methods or "raw" not in methods:
        raise ConfigError(f"fp32 methods must include 'raw' and {PAPER_CODEC!r} (the paper's ratio)")
    workers = default_workers() if workers is None else max(1, int(workers))
    state = _backbone_state(backbone)
    check_pair(masks, finetuned, state)
    names = [n for n in state if n in masks]  # backbone order: deterministic streams
    flat = {n: masks[n].detach().to("cpu").reshape(-1).numpy().astype(bool, copy=False) for n in names}
    absw = {n: state[n].detach().to("cpu", torch.float32).abs().reshape(-1).numpy() for n in names}
    ft = b"".join(_le_bytes(_fp32(n, finetuned[f"backbone.{n}"], "fine-tune")) for n in names)
    base = b"".join(_le_bytes(_fp32(n, state[n], "backbone")) for n in names)
    numel = sum(m.size for m in flat.values())
    active = sum(int(np.count_nonzero(m)) for m in flat.values()) / numel
    changed = float(np.count_nonzero(np.frombuffer(ft, np.uint32) != np.frombuffer(base, np.uint32))) / numel
    rest, rest_base = _rest_streams(finetuned, state, set(names))

    f_jobs = fp32_jobs(ft, base, methods=methods)
    m_jobs = mask_jobs(flat, absw)
    r_jobs = fp32_jobs(rest, rest_base, methods=methods, side="rest") if rest else []
    w_jobs = [(f"whole .mask {c}",
               lambda c=c: _mask_file_size(masks, backbone, mask_extras, mask_metadata, c))
              for c in (MASK_CODEC, "lzma")]
    out = run_jobs(f_jobs + m_jobs + r_jobs + w_jobs, workers=workers, progress=progress, slow_first=True)
    f_rows, out = out[:len(f_jobs)], out[len(f_jobs):]
    m_rows, out = out[:len(m_jobs)], out[len(m_jobs):]
    r_rows, (file_ans, file_lzma) = out[:len(r_jobs)], out[len(r_jobs):]

    rest_by = {r.method: r.compressed_bytes for r in r_rows}
    totals = {r.method: r.compressed_bytes + rest_by.get(r.method, 0) for r in f_rows}
    best_whole = min(totals, key=totals.get)
    whole = {"fft_raw_bytes": totals["raw"], "fft_best_bytes": totals[best_whole],
             "fft_best_method": best_whole, "fft_lzma_bytes": totals[PAPER_CODEC],
             "fft_rest_bytes": len(rest),
             "fft_by_method": totals, "mask_file_bytes": file_ans, "mask_file_lzma_bytes": file_lzma,
             "mask_extras_bytes": sum(t.numel() * t.element_size() for t in (mask_extras or {}).values())}
    mask_best = min(m_rows, key=lambda r: r.compressed_bytes)
    fp32_best = min(f_rows, key=lambda r: r.compressed_bytes)
    mby, fby = {r.method: r for r in m_rows}, {r.method: r for r in f_rows}
    ratios = {
        "paper": fby[PAPER_CODEC].compressed_bytes / mby[PAPER_CODEC].compressed_bytes,
        "honest": fp32_best.compressed_bytes / mask_best.compressed_bytes,
        "raw": fby["raw"].compressed_bytes / mby["raw"].compressed_bytes,
        "whole": whole["fft_best_bytes"] / whole["mask_file_bytes"],
        "whole_paper": whole["fft_lzma_bytes"] / whole["mask_file_lzma_bytes"],
    }
    info = dict(info or {}) | {"mask_best": mask_best.method, "fp32_best": fp32_best.method,
                               "workers": workers}
    return BenchResult(getattr(backbone, "name", type(backbone).__name__), len(names), numel, active, changed,
                       m_rows, f_rows, whole, ratios, dict(accuracy or {"mask": None, "fft": None}), info)


def _rest_streams(finetuned: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                  masked: set[str]) -> tuple[bytes, bytes]:
    """The fine-tune's tensors other than the masked ones (BN, head ...), and their XOR base: the
    backbone's tensor where there is one, zeros for the head. Padded to whole 4-byte words."""
    keys = [k for k in finetuned if not (k.startswith("backbone.") and k[len("backbone."):] in masked)]
    rest = b"".join(_le_bytes(finetuned[k]) for k in keys)
    base = b"".join(
        _le_bytes(state[k[len("backbone."):]].to(finetuned[k].dtype))
        if k.startswith("backbone.") else bytes(finetuned[k].numel() * finetuned[k].element_size())
        for k in keys)
    pad = bytes(-len(rest) % 4)
    return rest + pad, base + pad


def _mask_file_size(masks, backbone, extras, metadata, codec: str) -> int:
    """Size of the ``.mask`` file :func:`maskpack.save` writes (masks, extras, header)."""
    from .io import save

    with tempfile.TemporaryDirectory(prefix="maskpack-bench-") as tmp:
        path = os.path.join(tmp, "task.mask")
        save(path, masks, backbone, extras=extras, metadata=metadata, codec=codec)
        return os.path.getsize(path)


# ----------------------------------------------------------------------------- files


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """The last row of ``metrics.jsonl`` next to a task file (``{}`` when there is none)."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "metrics.jsonl"
    if not f.exists():
        return {}
    rows = [ln for ln in f.read_text().splitlines() if ln.strip()]
    try:
        return json.loads(rows[-1]) if rows else {}
    except ValueError:
        return {}


def load_finetuned(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an fft ``model.safetensors`` (state dict and metadata); no pickle involved.

    Raises:
        FileNotFoundError: the file does not exist. FormatError: it is not a safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "No such file", path)
    try:
        state = load_file(path)
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own types on malformed files
        raise FormatError(f"{path} is not a readable safetensors file ({exc}); pass the fine-tune's "
                          "model.safetensors") from exc
    if not any(k.startswith("backbone.") for k in state):
        raise FormatError(f"{path} holds no 'backbone.*' tensors: expected the model.safetensors of a "
                          "`maskpack train --method fft` run")
    return state, meta


def compare_files(mask_path: str | os.PathLike, finetuned_path: str | os.PathLike, *, backbone=None,
                  progress: Progress = None, info: dict[str, Any] | None = None,
                  workers: int | None = None) -> BenchResult:
    """:func:`compare` for a ``.mask`` file and an fft ``model.safetensors``.

    The backbone defaults to the one named in the ``.mask`` file; its hash is checked. Accuracies
    come from each run directory's ``metrics.jsonl`` when present.

    Raises:
        BackboneMismatchError: the mask, the fine-tune and the backbone do not belong together.
    """
    from .backbones import load_backbone
    from .io import read

    mask_path = os.fspath(mask_path)
    if not os.path.isfile(mask_path):
        raise FileNotFoundError(2, "No such file", mask_path)
    mf = read(mask_path)
    state, meta = load_finetuned(finetuned_path)
    ft_hash = meta.get("backbone.hash")
    if ft_hash and ft_hash != mf.backbone_hash:
        raise BackboneMismatchError(
            f"{mask_path} was made on backbone {mf.backbone_name!r} (sha256 {mf.backbone_hash[:12]}...) but "
            f"{os.fspath(finetuned_path)} on {meta.get('backbone', '?')!r} (sha256 {ft_hash[:12]}...): "
            "compare a mask and a fine-tune of the same backbone",
            expected=mf.backbone_hash, actual=ft_hash, backbone_name=mf.backbone_name)
    if backbone is None or isinstance(backbone, str):
        backbone = load_backbone(backbone or mf.backbone_name)
    masks = mf.masks(backbone)
    acc = {"mask": read_metrics(mask_path).get("accuracy"),
           "fft": read_metrics(finetuned_path).get("accuracy")}
    info = dict(info or {}) | {"mask_path": mask_path, "finetuned_path": os.fspath(finetuned_path),
                               "mask_dataset": mf.metadata.get("dataset"), "fft_dataset": meta.get("dataset")}
    return compare(masks, backbone, state, mask_extras=mf.extras, mask_metadata=dict(mf.metadata),
                   accuracy=acc, progress=progress, info=info, workers=workers)


# ----------------------------------------------------------------------------- training both sides


@dataclass
class PairConfig:
    """The two training runs of ``maskpack bench``: a mask and a full fine-tune, same budget.

    Both use the trainer's default recipe for their method (masks: normalised score lr 0.002 + BN
    weight/bias; fft: lr 0.01, weight decay 5e-4), the same data, epochs, image size, batch size
    and seed.
    """

    dataset: str = "digits"
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None  # local weights file (docs/backbones.md)
    epochs: int = 6
    image_size: int | None = 32
    batch_size: int = 64
    data_dir: str | None = None
    download: bool = False
    out: str = "runs/bench"
    device: str = "auto"
    seed: int = 0
    max_steps_per_epoch: int | None = None
    quiet: bool = True


_REUSE_KEYS = ("backbone", "dataset", "epochs", "image_size", "batch_size", "seed", "method")


def _check_reuse(run_dir: Path, config: PairConfig, method: str) -> None:
    """A finished run is reused only when it was trained with the settings asked for now."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return  # no record (a hand-made run directory): trust the caller
    want = {"backbone": config.backbone, "dataset": config.dataset, "epochs": config.epochs,
            "image_size": config.image_size, "batch_size": config.batch_size, "seed": config.seed,
            "method": method}
    for key in _REUSE_KEYS:
        if key in saved and saved[key] != want[key] and not (key == "image_size" and want[key] is None):
            raise ConfigError(f"{run_dir} was trained with {key}={saved[key]!r}, not {want[key]!r}: choose "
                              "another --out, or remove that directory to retrain")


def train_pair(config: PairConfig, *, callbacks=()) -> dict[str, Any]:
    """Train the mask and the fine-tune into ``out/mask`` and ``out/fft``.

    A side whose run directory already holds its finished task file is reused, not retrained.

    Returns:
        ``{"mask_path", "fft_path", "accuracy": {"mask", "fft"}, "train_s": {"mask", "fft"}}``.
    """
    from .train import TrainConfig, run

    out: dict[str, Any] = {"accuracy": {}, "train_s": {}}
    for method, fname in (("mask", "task.mask"), ("fft", "model.safetensors")):
        run_dir = Path(config.out) / method
        task = run_dir / fname
        if task.exists():
            _check_reuse(run_dir, config, method)
            out[f"{method}_path"] = str(task)
            out["accuracy"][method] = read_metrics(task).get("accuracy")
            out["train_s"][method] = 0.0
            continue
        if (run_dir / "checkpoint.pt").exists():
            raise ConfigError(f"{run_dir} holds an unfinished run: finish it with `maskpack train --resume "
                              f"--out {run_dir}` or choose another --out")
        tc = TrainConfig(backbone=config.backbone, backbone_weights=config.backbone_weights,
                         dataset=config.dataset, data_dir=config.data_dir,
                         download=config.download, method=method, epochs=config.epochs,
                         batch_size=config.batch_size, image_size=config.image_size, seed=config.seed,
                         device=config.device, max_steps_per_epoch=config.max_steps_per_epoch,
                         out=str(run_dir), quiet=config.quiet, eval_knn="never", eval_every=0)
        t0 = time.perf_counter()
        result = run(tc, callbacks)
        out["train_s"][method] = time.perf_counter() - t0
        out[f"{method}_path"] = str(result.task_path)
        out["accuracy"][method] = result.metrics.get("accuracy")
    return out


# ----------------------------------------------------------------------------- plot


def plot(result: BenchResult, path: str | os.PathLike) -> None:
    """Bar chart of compressed sizes (log scale), masks and fp32 weights side by side.

    Raises:
        ConfigError: matplotlib is not installed (``pip install 'maskpack[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'maskpack[plot]' (or pip install "
                          "matplotlib)") from exc
    rows = result.mask_rows + result.fp32_rows
    labels = [f"{r.side}: {r.method}" for r in rows]
    sizes = [r.compressed_bytes / 1e6 for r in rows]
    colors = ["#2a7ab9" if r.side == "mask" else "#d9822b" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.26 * len(rows) + 1.4), dpi=90)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, sizes, color=colors)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("compressed size, MB (log scale)")
    for yi, r, s in zip(y, rows, sizes, strict=True):
        ax.text(s, yi, f" {s:.3g} MB ({r.reduction:.1f}%)", va="center", fontsize=7)
    ax.set_xlim(min(sizes) / 2, max(sizes) * 8)
    ax.set_title(f"{result.backbone}, {result.numel:,} masked weights: masks are "
                 f"{result.ratios['honest']:.0f}x smaller\n(best codec on each side; "
                 f"{result.ratios['paper']:.0f}x with lzma -9 on both)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
