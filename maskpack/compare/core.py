"""The storage comparison: a task's binary masks against the fine-tuned fp32 weights of the same tensors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import io
from ..errors import BackboneMismatchError, ConfigError, FormatError
from ..storage import bits
from ..storage.codecs import get_codec
from .methods import FP32_DEFAULT, GENERAL, _general_decode, _general_encode, fp32_methods
from .pair import read_metrics
from .result import BenchResult, Row

Progress = Callable[[str], None] | None
MASK_CODEC = "ans"
PAPER_CODEC = "lzma-9"


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
    from ..errors import CodecError

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
    from ..errors import CodecError

    payload, t_enc = _timed(_general_encode, codec, level, packed)
    restored, t_dec = _timed(_general_decode, codec, payload, len(packed))
    if restored != packed:
        raise CodecError(f"mask codec {name!r} did not round-trip exactly")
    return Row("mask", name, len(packed), len(payload), t_enc, t_dec)


def _mask_ans_job(masks: dict[str, np.ndarray], absw: dict[str, np.ndarray], raw: int) -> Row:
    from ..errors import CodecError

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
               lambda c=c: _mask_file_parts(masks, backbone, mask_extras, mask_metadata, c))
              for c in (MASK_CODEC, "lzma")]
    b_jobs = fp32_jobs(*_bf16_streams(finetuned, state), methods=list(BF16_METHODS), side="bf16")
    out = run_jobs(f_jobs + m_jobs + r_jobs + b_jobs + w_jobs, workers=workers, progress=progress,
                   slow_first=True)
    f_rows, out = out[:len(f_jobs)], out[len(f_jobs):]
    m_rows, out = out[:len(m_jobs)], out[len(m_jobs):]
    r_rows, out = out[:len(r_jobs)], out[len(r_jobs):]
    b_rows, (parts, parts_lzma) = out[:len(b_jobs)], out[len(b_jobs):]
    whole = _whole(f_rows, r_rows, b_rows, parts, parts_lzma, len(rest), mask_extras)
    mask_best = min(m_rows, key=lambda r: r.compressed_bytes)
    fp32_best = min(f_rows, key=lambda r: r.compressed_bytes)
    mby, fby = {r.method: r for r in m_rows}, {r.method: r for r in f_rows}
    ratios = {
        "paper": fby[PAPER_CODEC].compressed_bytes / mby[PAPER_CODEC].compressed_bytes,
        "honest": fp32_best.compressed_bytes / mask_best.compressed_bytes,
        "raw": fby["raw"].compressed_bytes / mby["raw"].compressed_bytes,
        "whole": whole["fft_best_bytes"] / whole["mask_file_bytes"],
        "whole_paper": whole["fft_lzma_bytes"] / whole["mask_file_lzma_bytes"],
        # LOSSY: the fine-tune rounded to bfloat16 (it is then no longer the evaluated model)
        "whole_bf16_lossy": whole["fft_bf16_best_bytes"] / whole["mask_file_bytes"],
    }
    info = dict(info or {}) | {"mask_best": mask_best.method, "fp32_best": fp32_best.method,
                               "workers": workers}
    return BenchResult(getattr(backbone, "name", type(backbone).__name__), len(names), numel, active, changed,
                       m_rows, f_rows, whole, ratios, dict(accuracy or {"mask": None, "fft": None}), info)


def _whole(f_rows: list[Row], r_rows: list[Row], b_rows: list[Row], parts: dict[str, int],
           parts_lzma: dict[str, int], rest_len: int, mask_extras) -> dict[str, Any]:
    """The whole-task sizes: the fine-tune's tensors with each method (masked ones + the rest), its
    LOSSY bfloat16 copy, and the ``.mask`` file with its parts."""
    rest_by = {r.method: r.compressed_bytes for r in r_rows}
    totals = {r.method: r.compressed_bytes + rest_by.get(r.method, 0) for r in f_rows}
    best_whole = min(totals, key=totals.get)
    bf16_best = min(b_rows, key=lambda r: r.compressed_bytes)
    return {"fft_raw_bytes": totals["raw"], "fft_best_bytes": totals[best_whole],
            "fft_best_method": best_whole, "fft_lzma_bytes": totals[PAPER_CODEC], "fft_rest_bytes": rest_len,
            "fft_by_method": totals, "mask_file_bytes": parts["total"],
            "mask_file_lzma_bytes": parts_lzma["total"],
            "mask_extras_bytes": sum(t.numel() * t.element_size() for t in (mask_extras or {}).values()),
            "mask_file_parts": parts,
            "fft_bf16_raw_bytes": next(r.raw_bytes for r in b_rows if r.method == "raw"),
            "fft_bf16_best_bytes": bf16_best.compressed_bytes, "fft_bf16_best_method": bf16_best.method,
            "fft_bf16_by_method": {r.method: r.compressed_bytes for r in b_rows}}


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


# Methods tried on the fine-tune rounded to bfloat16 (the LOSSY row); the best one is reported.
BF16_METHODS = ("raw", "zstd-19", "lzma-9", "bytegroup+zstd-19", "xor+bytegroup+zstd-19")


def _bf16_streams(finetuned: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """The whole fine-tune with its float tensors rounded to bfloat16 (integer ones as they are),
    and its XOR base (the backbone's tensors in the same dtype, zeros for the head), padded to
    whole 4-byte words."""
    def as_stored(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.bfloat16) if t.is_floating_point() else t.detach().to("cpu")

    data, base = [], []
    for k, t in finetuned.items():
        v = as_stored(t)
        data.append(_le_bytes(v.view(torch.int16) if v.dtype == torch.bfloat16 else v))
        ref = state.get(k.removeprefix("backbone.")) if k.startswith("backbone.") else None
        if ref is None or tuple(ref.shape) != tuple(t.shape):
            base.append(bytes(len(data[-1])))
        else:
            r = as_stored(ref.to(t.dtype))
            base.append(_le_bytes(r.view(torch.int16) if r.dtype == torch.bfloat16 else r))
    d, b = b"".join(data), b"".join(base)
    pad = bytes(-len(d) % 4)
    return d + pad, b + pad


def _mask_file_parts(masks, backbone, extras, metadata, codec: str) -> dict[str, int]:
    """Bytes of the ``.mask`` file :func:`maskpack.save` writes, by part: ``masks`` (the tensor
    payloads), ``extras`` (the stored extras blob), of which ``head`` is the head's tensors stored
    alone and ``bn`` the rest of the blob (BN weight/bias and statistics), ``header`` (preamble and
    JSON header), and ``total``."""
    import tempfile

    from safetensors.torch import save as st_save

    from ..storage.container import pack_extras

    data = io.to_bytes(masks, backbone, extras=extras, metadata=metadata, codec=codec)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "task.mask")
        io.write_atomic(path, data)
        mf = io.read(path)
        mask_bytes, extras_bytes = sum(t.length for t in mf.tensors), mf.extras_bytes
    head = {k: v.detach().cpu().contiguous() for k, v in (extras or {}).items() if k.startswith("head.")}
    head_bytes = min(len(pack_extras(st_save(head))[0]), extras_bytes) if head else 0
    return {"total": len(data), "masks": mask_bytes, "extras": extras_bytes, "head": head_bytes,
            "bn": extras_bytes - head_bytes, "header": len(data) - mask_bytes - extras_bytes}


# ----------------------------------------------------------------------------- files


def compare_files(mask_path: str | os.PathLike, finetuned_path: str | os.PathLike, *, backbone=None,
                  progress: Progress = None, info: dict[str, Any] | None = None,
                  workers: int | None = None) -> BenchResult:
    """:func:`compare` for a ``.mask`` file and an fft ``model.safetensors``.

    The backbone defaults to the one named in the ``.mask`` file; its hash is checked. Accuracies
    come from each run directory's ``metrics.jsonl`` when present.

    Raises:
        BackboneMismatchError: the mask, the fine-tune and the backbone do not belong together.
    """
    from ..backbones import load_backbone

    mask_path = os.fspath(mask_path)
    if not os.path.isfile(mask_path):
        raise FileNotFoundError(2, "No such file", mask_path)
    mf = io.read(mask_path)
    state, meta = io.load_finetuned(finetuned_path)
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
    return compare(masks, backbone, state, mask_extras=mf.read_extras(dequantize=False),
                   mask_metadata=dict(mf.metadata),
                   accuracy=acc, progress=progress, info=info, workers=workers)
