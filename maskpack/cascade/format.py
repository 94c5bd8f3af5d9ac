"""Storing a cascade as one ``.mask`` file, through :mod:`maskpack.io` (layout: docs/cascade.md).

* masks, codec ``ans``: the dispatcher's masks under their own names, each expert as the XOR of
  its mask with the dispatcher's (``expert<k>/<name>``, right after ``<name>``), coded with the
  same backbone-conditioned coder;
* extras: ``dispatcher/<name>``, ``expert<k>/<name>`` (only what differs from the dispatcher's),
  ``router/<name>`` (float16, float32 or float64), ``combine/<mode>/<name>`` (:mod:`.combine`);
* metadata: ``cascade.format``, ``cascade.version``, ``cascade.experts``, ``cascade.modes``,
  ``cascade.combine`` (the combination's kind; version 1 files have none and mean ``pca``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..errors import ConfigError, FormatError
from .combine import KINDS, check_kind, shape_error
from .model import MODES, CascadeModel

FORMAT = "maskpack-cascade"
FORMAT_VERSION = "2"
#: versions this maskpack reads: 1 (dense whitened-PCA combination only) and 2 (``cascade.combine``)
READ_VERSIONS = ("1", "2")
CODEC = "ans"
ROUTER_DTYPES = (torch.float16, torch.float32, torch.float64)


def _expert_extras(disp: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The expert's extras that differ from the dispatcher's (the rest are stored once)."""
    def same(k: str, v: torch.Tensor) -> bool:
        d = disp.get(k)
        return d is not None and d.dtype == v.dtype and d.shape == v.shape and torch.equal(d, v)

    return {k: v for k, v in expert.items() if not same(k, v)}


def _stored_masks(dispatcher: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]):
    """``{name: D, expert1/name: D ^ E1, ...}``: what the file holds, in storage order."""
    out = {}
    for k, em in enumerate(experts):
        if set(em) != set(dispatcher):
            raise FormatError(f"expert {k + 1} masks other tensors than the dispatcher")
    for name, d in dispatcher.items():
        out[name] = d
        for k, em in enumerate(experts):
            out[f"expert{k + 1}/{name}"] = d.cpu() ^ em[name].cpu()
    return out


def _stored_extras(dispatcher_extras, expert_extras, router, combine) -> dict[str, torch.Tensor]:
    tensors = {f"dispatcher/{k}": v for k, v in dispatcher_extras.items()}
    for k, ex in enumerate(expert_extras):
        tensors.update({f"expert{k + 1}/{n}": v for n, v in _expert_extras(dispatcher_extras, ex).items()})
    tensors.update({f"router/{k}": v for k, v in router.items()})
    for mode, params in combine.items():
        tensors.update({f"combine/{mode}/{k}": v for k, v in params.items()})
    return tensors


def save_cascade(path: str | os.PathLike, backbone, dispatcher_masks: dict[str, torch.Tensor],
                 dispatcher_extras: dict[str, torch.Tensor], expert_masks: list[dict[str, torch.Tensor]],
                 expert_extras: list[dict[str, torch.Tensor]], router: dict[str, torch.Tensor],
                 combine: dict[str, dict[str, torch.Tensor]], *, combine_kind: str = "pca",
                 metadata: dict[str, str] | None = None, version: str = FORMAT_VERSION) -> dict[str, Any]:
    """Write a cascade as one ``.mask`` file (atomically).

    Args:
        path: the file to write.
        backbone: the frozen backbone (module or :class:`maskpack.Backbone`).
        dispatcher_masks, dispatcher_extras: the dispatcher's masks and extras.
        expert_masks, expert_extras: each expert's (the same masked tensors as the dispatcher).
        router: the router tensors (stored in their own dtype).
        combine: per mode, the combination's tensors.
        combine_kind: the combination (:data:`maskpack.cascade.combine.KINDS`).
        metadata: extra string metadata.
        version: ``"2"``, or ``"1"`` for readers that know only the dense ``pca`` combination.

    Returns:
        The storage report (bytes of each part and the cost as a multiple of one mask), see
        :func:`storage_report`.

    Raises:
        ConfigError: an unknown kind or version, or version 1 with another kind than ``pca``.
    """
    check_kind(combine_kind)
    if version not in READ_VERSIONS or (version == "1" and combine_kind != "pca"):
        raise ConfigError(f"cannot write cascade version {version!r} with combination {combine_kind!r}: "
                          f"use version {FORMAT_VERSION} (version 1 holds only the pca combination)")
    masks = _stored_masks(dispatcher_masks, expert_masks)
    tensors = _stored_extras(dispatcher_extras, expert_extras, router, combine)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"cascade.format": FORMAT, "cascade.version": version,
                 "cascade.experts": str(len(expert_masks)), "cascade.modes": ",".join(combine)})
    if version != "1":
        meta["cascade.combine"] = combine_kind
    data = io.to_bytes(masks, backbone, extras=tensors, metadata=meta, codec=CODEC)
    io.write_atomic(path, data)
    # the same file without the combination PCAs (built, not written): extras are compressed as
    # one blob, so the PCAs' share of the file can only be measured this way
    rest = {k: v for k, v in tensors.items() if not k.startswith("combine/")}
    without = len(io.to_bytes(masks, backbone, extras=rest, metadata=meta, codec=CODEC))
    payload = {t.name: t.length for t in io.read(path).tensors}
    sizes = {"dispatcher": sum(payload[n] for n in dispatcher_masks),
             "experts": [sum(payload[f"expert{k + 1}/{n}"] for n in dispatcher_masks)
                         for k in range(len(expert_masks))]}
    report = storage_report(backbone, dispatcher_masks, dispatcher_extras, expert_masks, sizes, tensors,
                            len(data), without)
    report.update(combine=combine_kind, router_dtype=str(next(iter(router.values())).dtype).removeprefix(
        "torch.") if router else None, version=version)
    return report


def _nbytes(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(prefix))


def storage_report(backbone, dispatcher_masks, dispatcher_extras, expert_masks, sizes: dict[str, Any],
                   tensors: dict[str, torch.Tensor], file_bytes: int,
                   file_bytes_without_combine: int) -> dict[str, Any]:
    """Bytes of each part of a cascade file and multiples of one mask.

    ``one_mask`` is the dispatcher's masks coded with ``ans``; ``experts_independent`` codes
    each expert's mask on its own with the same coder (what storing separate ``.mask`` files
    would cost), for comparison with the XOR deltas actually stored.
    """
    indep = [sum(len(e[3]) for e in io.encode_masks(em, backbone, codec=CODEC)) for em in expert_masks]
    one = max(sizes["dispatcher"], 1)
    # the dispatcher alone as an ordinary task file, for the whole-file multiple
    task_file = len(io.to_bytes(dispatcher_masks, backbone, extras=dispatcher_extras, codec=CODEC))
    deltas = sum(sizes["experts"])
    flips = [sum(int((dispatcher_masks[n] ^ em[n]).sum()) for n in em) for em in expert_masks]
    numel = sum(m.numel() for m in dispatcher_masks.values())
    return {
        "file_bytes": file_bytes, "dispatcher_task_file_bytes": task_file,
        "one_mask_bytes": sizes["dispatcher"], "expert_delta_bytes": sizes["experts"],
        "expert_independent_bytes": indep, "expert_flipped_fraction": [f / max(numel, 1) for f in flips],
        "dispatcher_extras_bytes": _nbytes(tensors, "dispatcher/"),
        "expert_extras_bytes": _nbytes(tensors, "expert"),
        "router_bytes": _nbytes(tensors, "router/"), "combine_bytes": _nbytes(tensors, "combine/"),
        "masks_multiple": (sizes["dispatcher"] + deltas) / one,
        "masks_multiple_independent": (sizes["dispatcher"] + sum(indep)) / one,
        "file_multiple": file_bytes / max(task_file, 1),
        "file_bytes_without_combine": file_bytes_without_combine,
        "file_multiple_without_combine": file_bytes_without_combine / max(task_file, 1),
    }


def is_cascade(path: str | os.PathLike) -> bool:
    """True when ``path`` is a ``.mask`` file holding a cascade (or a directory with ``cascade.mask``)."""
    p = Path(path)
    if p.is_dir():
        p = p / "cascade.mask"
    if not p.is_file():
        return False
    try:
        return io.read(p).metadata.get("cascade.format") == FORMAT
    except (FormatError, OSError):
        return False


def combine_kind_of(mf: io.MaskFile) -> str:
    """The combination kind of an opened cascade file (version 1: ``pca``)."""
    meta = mf.metadata
    if meta.get("cascade.version") == "1":
        return "pca"
    kind = meta.get("cascade.combine", "")
    if kind not in KINDS:
        raise FormatError(f"{mf.path}: unknown combination {kind!r} in metadata 'cascade.combine' "
                          f"(this maskpack knows {', '.join(KINDS)}): upgrade maskpack")
    return kind


def read_cascade(path: str | os.PathLike) -> tuple[io.MaskFile, int, list[str]]:
    """Open a cascade file: its :class:`maskpack.io.MaskFile`, number of experts and modes.

    Raises:
        FormatError: not a cascade, an unsupported version, another codec, or bad cascade metadata.
    """
    mf = io.read(path)
    meta = mf.metadata
    if meta.get("cascade.format") != FORMAT:
        raise FormatError(f"{path} is a .mask file but not a cascade: load it with maskpack.load")
    if meta.get("cascade.version") not in READ_VERSIONS:
        raise FormatError(f"{path}: cascade version {meta.get('cascade.version')!r} is not supported "
                          f"(this maskpack reads {', '.join(READ_VERSIONS)}): upgrade maskpack")
    if mf.codec != CODEC:
        raise FormatError(f"{path}: cascade masks must use codec {CODEC!r}, got {mf.codec!r}")
    try:
        k = int(meta.get("cascade.experts", ""))
    except ValueError:
        raise FormatError(f"{path}: metadata 'cascade.experts' must be an integer") from None
    modes = [m for m in meta.get("cascade.modes", "").split(",") if m]
    if k < 1 or not modes or any(m not in MODES for m in modes):
        raise FormatError(f"{path}: bad cascade metadata (experts {k}, modes {modes})")
    return mf, k, modes


def _split_masks(mf: io.MaskFile, decoded: dict[str, torch.Tensor], k: int):
    """Dispatcher masks and each expert's (its XOR delta undone)."""
    disp = {n: m for n, m in decoded.items() if "/" not in n}
    experts: list[dict[str, torch.Tensor]] = [{} for _ in range(k)]
    for full, delta in decoded.items():
        prefix, sep, name = full.partition("/")
        if not sep:
            continue
        idx = int(prefix[6:]) - 1 if prefix.startswith("expert") and prefix[6:].isdigit() else -1
        if not 0 <= idx < k or name not in disp:
            raise FormatError(f"{mf.path}: unexpected tensor {full!r} "
                              "(expert deltas must follow their dispatcher tensor)")
        experts[idx][name] = delta ^ disp[name]
    for i, e in enumerate(experts):
        if set(e) != set(disp):
            raise FormatError(f"{mf.path}: expert {i + 1} does not cover the dispatcher's "
                              f"{len(disp)} tensors")
    return disp, experts


def _split_extras(mf: io.MaskFile, k: int, modes: list[str]):
    tensors = mf.extras
    if not tensors:
        raise FormatError(f"{mf.path}: a cascade needs its extras (router, combination); the file has none")

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {n.removeprefix(prefix): v for n, v in tensors.items() if n.startswith(prefix)}

    disp = group("dispatcher/")
    experts = [{**disp, **group(f"expert{i + 1}/")} for i in range(k)]
    router = group("router/")
    combine = {m: group(f"combine/{m}/") for m in modes}
    _check_params(mf.path, router, combine, k, combine_kind_of(mf))
    return disp, experts, router, combine


def _check_params(path: str, router: dict[str, torch.Tensor], combine: dict[str, dict[str, torch.Tensor]],
                  k: int, kind: str) -> None:
    need = {"pca_mean", "pca_components", "gmm_means", "gmm_precisions_cholesky", "gmm_weights"}
    if set(router) != need:
        raise FormatError(f"{path}: router tensors must be {sorted(need)}, got {sorted(router)}")
    f = router["pca_mean"].shape
    p = router["pca_components"].shape
    ok = (len(f) == 1 and len(p) == 2 and p[1] == f[0] and tuple(router["gmm_means"].shape) == (k, p[0])
          and tuple(router["gmm_precisions_cholesky"].shape) == (k, p[0], p[0])
          and tuple(router["gmm_weights"].shape) == (k,))
    if not ok:
        raise FormatError(f"{path}: router tensors have inconsistent shapes for {k} experts")
    if any(v.dtype not in ROUTER_DTYPES for v in router.values()):
        raise FormatError(f"{path}: router tensors must be float16, float32 or float64")
    for mode, params in combine.items():
        err = shape_error(kind, params, k + 1, f[0], p[0])
        if err:
            raise FormatError(f"{path}: combination {mode!r} ({kind}) {err}")


def load_cascade(path: str | os.PathLike, backbone=None, *, mode: str | None = None) -> CascadeModel:
    """Load a cascade file as a :class:`CascadeModel` (eval mode, CPU).

    Args:
        path: a cascade ``.mask`` file (or a directory holding ``cascade.mask``).
        backbone: the :class:`maskpack.Backbone` it was trained on, a registry name, or None for the
            name stored in the file. Its hash is checked.
        mode: ``unconditional`` (K+1 forward passes) or ``conditional`` (2); default: the first
            stored mode.

    Raises:
        FormatError: not a cascade, or a malformed one. BackboneMismatchError: wrong backbone.

    Example:
        >>> cascade = load_cascade("runs/cascade/cascade.mask")   # doctest: +SKIP
        >>> cascade(images).shape                                 # (N, 1280)
    """
    from ..rehydrate import rehydrate

    p = Path(path)
    if p.is_dir():
        p = p / "cascade.mask"
    if not p.exists():
        raise FileNotFoundError(2, "No such file", str(p))
    mf, k, modes = read_cascade(p)
    if backbone is None or isinstance(backbone, str):
        from ..backbones import load_backbone

        backbone = load_backbone(backbone or mf.backbone_name)
    d_masks, e_masks = _split_masks(mf, mf.masks(backbone), k)  # checks the backbone's hash first
    d_extras, e_extras, router, combine = _split_extras(mf, k, modes)
    disp = rehydrate(backbone, d_masks, d_extras, scale=mf.scale)
    experts = [rehydrate(backbone, m, x, scale=mf.scale) for m, x in zip(e_masks, e_extras, strict=True)]
    model = CascadeModel(disp, experts, router, combine, mode=mode or modes[0],
                         combine_kind=combine_kind_of(mf))
    model._mode(mode)  # an unknown mode is an error now, not at the first forward
    model.metadata = dict(mf.metadata)
    return model
