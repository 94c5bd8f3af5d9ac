"""Save and load tasks as ``.mask`` files: the bridge between torch and :mod:`maskpack.storage`.

Example:
    >>> import maskpack
    >>> bb = maskpack.load_backbone()                                   # doctest: +SKIP
    >>> maskpack.save("task.mask", masks, bb, extras={"head.weight": w}) # doctest: +SKIP
    >>> model = maskpack.load("task.mask")                              # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones.hashing import backbone_hash, state_dict_hash
from .errors import BackboneMismatchError, ConfigError, FormatError
from .extras import decode_head
from .model import TaskModel
from .storage import container
from .storage.atomic import leftover_temp_files
from .storage.codecs import DEFAULT_CODEC, available_codecs, get_codec
from .storage.entropy import TensorContexts

__all__ = ["DEFAULT_CODEC", "MaskFile", "available_codecs", "backbone_tensors", "encode_masks",
           "is_mask_file", "leftover_temp_files", "load", "load_finetuned", "load_task", "load_task_into",
           "read", "save", "save_finetuned", "to_bytes", "write_atomic", "write_text"]

SCALE_KEY = "mask.scale"

# ans contexts of the last backbone used, keyed by (backbone hash, tensor name): decoding several
# tasks over one backbone computes the |W| buckets and their sort only once.
_CONTEXTS: dict[tuple[str, str], TensorContexts] = {}


def _contexts(bb_hash: str | None, name: str, w: torch.Tensor) -> TensorContexts:
    if bb_hash is None:
        return TensorContexts(_absw(w))
    if any(k[0] != bb_hash for k in _CONTEXTS):  # one backbone at a time
        _CONTEXTS.clear()
    key = (bb_hash, name)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = TensorContexts(_absw(w))
    return _CONTEXTS[key]


def _module(backbone) -> nn.Module:
    module = getattr(backbone, "model", backbone)
    if not isinstance(module, nn.Module):
        raise ConfigError("backbone must be a maskpack.Backbone or an nn.Module, got "
                          f"{type(backbone).__name__}")
    return module


def _name_of(backbone) -> str:
    name = getattr(backbone, "name", None)
    return name if isinstance(name, str) else type(_module(backbone)).__name__


def _hash_of(backbone) -> str:
    return backbone.hash() if callable(getattr(backbone, "hash", None)) else backbone_hash(_module(backbone))


def backbone_tensors(backbone) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a backbone (a :class:`maskpack.Backbone` or module) by name."""
    return _tensors(_module(backbone))


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(module.named_buffers())
    out.update(module.named_parameters())
    return out


def _absw(t: torch.Tensor) -> np.ndarray:
    """|W| as flat float32 numpy: the ans codec's contexts."""
    return t.detach().to("cpu", torch.float32).abs().reshape(-1).numpy()


def _extras_blob(extras: dict[str, torch.Tensor] | None) -> bytes | None:
    if not extras:
        return None
    from safetensors.torch import save as st_save

    clean = {}
    for key, value in extras.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(f"extras must map names to tensors; got {key!r}: {type(value).__name__}")
        clean[key] = value.detach().to("cpu").contiguous().clone()
    return st_save(clean)


def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ConfigError(f"metadata must map strings to strings; got {k!r}: {type(v).__name__} "
                              "(convert values with str())")
    return metadata


def _storage_name(name: str) -> str:
    """The backbone tensor a stored mask refers to: a cascade stores expert deltas as
    ``expert<k>/<name>`` over the same backbone tensor as ``<name>``."""
    return name.rsplit("/", 1)[-1]


def encode_masks(masks: dict[str, torch.Tensor], backbone, *, codec: str = DEFAULT_CODEC,
                 level: int | None = None) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    """Encode masks as the payloads of a ``.mask`` file, in backbone order.

    Args:
        masks: ``{name: BoolTensor}``; a name is a backbone tensor's name, or ``<prefix>/<name>``
            for a mask over the same tensor (cascade expert deltas), stored right after it.
        backbone: a :class:`maskpack.Backbone` or ``nn.Module`` (``ans`` uses its |W| as contexts).
        codec, level: as for :func:`save`.

    Returns:
        ``(name, shape, active count, payload)`` per mask in file order.

    Raises:
        FormatError: a mask names no backbone tensor, is not bool, or has the wrong shape.
    """
    cod = get_codec(codec)
    level = cod.check_level(level)
    if not isinstance(masks, dict):
        raise ConfigError(f"masks must be a dict of name -> BoolTensor, got {type(masks).__name__}")
    weights = _tensors(_module(backbone))
    unknown = sorted(n for n in masks if _storage_name(n) not in weights)
    if unknown:
        raise FormatError(f"mask {unknown[0]!r} names no tensor of backbone {_name_of(backbone)!r}")
    by_tensor: dict[str, list[str]] = {}
    for name in masks:  # a tensor's own mask first, then prefixed ones in the caller's order
        group = by_tensor.setdefault(_storage_name(name), [])
        if name == _storage_name(name):
            group.insert(0, name)
        else:
            group.append(name)
    bb_hash = _hash_of(backbone) if cod.needs_backbone else None
    entries = []
    for tname, w in weights.items():  # backbone order: the bytes do not depend on dict order
        for name in by_tensor.get(tname, ()):
            m = masks[name]
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise FormatError(f"mask {name!r} must be a torch.bool tensor, got "
                                  f"{getattr(m, 'dtype', type(m).__name__)}")
            if tuple(m.shape) != tuple(w.shape):
                raise FormatError(f"mask {name!r} has shape {tuple(m.shape)}, the backbone's tensor "
                                  f"{tuple(w.shape)}")
            flat = m.detach().to("cpu").reshape(-1).numpy()
            payload = cod.encode(flat, _contexts(bb_hash, tname, w) if cod.needs_backbone else None, level)
            entries.append((name, tuple(m.shape), int(np.count_nonzero(flat)), payload))
    return entries


def to_bytes(masks: dict[str, torch.Tensor], backbone, *, extras: dict[str, torch.Tensor] | None = None,
             metadata: dict[str, str] | None = None, codec: str = DEFAULT_CODEC,
             level: int | None = None) -> bytes:
    """The complete ``.mask`` file :func:`save` writes, as bytes (arguments as for :func:`save`)."""
    entries = encode_masks(masks, backbone, codec=codec, level=level)
    return container.build(backbone_name=_name_of(backbone), backbone_hash=_hash_of(backbone),
                           codec=get_codec(codec).name, tensors=entries, extras=_extras_blob(extras),
                           metadata=_check_metadata(metadata))


def save(path: str | os.PathLike, masks: dict[str, torch.Tensor], backbone, *,
         extras: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None,
         codec: str = DEFAULT_CODEC, level: int | None = None) -> None:
    """Write masks, extras and metadata to a ``.mask`` file bound to ``backbone``'s hash.

    Args:
        path: destination; written atomically (temp file, fsync, rename).
        masks: ``{parameter name: BoolTensor}`` in the backbone's naming.
        backbone: a :class:`maskpack.Backbone` or the ``nn.Module`` the masks were trained on.
        extras: trained tensors in :class:`TaskModel` naming (``head.weight``, BN statistics ...),
            stored losslessly as a safetensors blob.
        metadata: string-to-string notes (config, dataset, metrics; ``mask.scale``).
        codec: one of :func:`maskpack.storage.available_codecs` (default ``ans``).
        level: compression level for codecs that have one.

    Example:
        >>> save("task.mask", {"0.weight": torch.ones(4, 4, dtype=torch.bool)}, net)  # doctest: +SKIP
    """
    write_atomic(path, to_bytes(masks, backbone, extras=extras, metadata=metadata, codec=codec, level=level))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename): the one
    writer of every file maskpack produces (tasks, checkpoints, run records, unpacked weights)."""
    container.write_atomic(path, data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` for UTF-8 text."""
    write_atomic(path, text.encode("utf-8"))


def is_mask_file(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with the ``.mask`` magic bytes (nothing else is checked)."""
    with open(path, "rb") as f:
        return f.read(len(container.MAGIC)) == container.MAGIC


def load_finetuned(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a fine-tune's ``model.safetensors`` (TaskModel state dict and metadata); no pickle.

    Raises:
        FileNotFoundError: the file does not exist. FormatError: it is not a safetensors file of a
        ``maskpack train --method fft`` run.
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


def save_finetuned(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a full TaskModel state dict as safetensors, atomically."""
    from safetensors.torch import save as st_save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    write_atomic(path, st_save(clean, metadata=_check_metadata(metadata)))


class MaskFile:
    """A ``.mask`` file whose header has been read and validated; payloads are read on demand.

    Attributes:
        path, header (the JSON header as a dict), version, backbone_name, backbone_hash, codec,
        metadata, tensors (entries with name, shape, active, offset, length, crc32), file_size.

    Example:
        >>> mf = read("task.mask")                       # doctest: +SKIP
        >>> mf.codec, mf.backbone_name, mf.active_fraction
        >>> masks = mf.masks(load_backbone(mf.backbone_name))
    """

    def __init__(self, path: str | os.PathLike, info: container.Container):
        self.path = os.fspath(path)
        self._info = info
        self.header = info.header
        self.version = info.version
        self.backbone_name = info.backbone_name
        self.backbone_hash = info.backbone_hash
        self.codec = info.codec
        self.metadata = info.metadata
        self.tensors = info.tensors
        self.file_size = info.file_size

    def __repr__(self) -> str:
        return (f"MaskFile({self.path!r}, backbone={self.backbone_name!r}, codec={self.codec!r}, "
                f"tensors={len(self.tensors)}, bytes={self.file_size})")

    @property
    def scale(self) -> bool:
        """Whether the masks were trained with alpha scaling (metadata ``mask.scale``, default true)."""
        value = self.metadata.get(SCALE_KEY, "true").strip().lower()
        if value not in ("true", "false", "1", "0"):
            raise FormatError(f"{self.path}: metadata {SCALE_KEY!r} must be 'true' or 'false', got {value!r}")
        return value in ("true", "1")

    @property
    def numel(self) -> int:
        """Total number of masked weights."""
        return sum(t.numel for t in self.tensors)

    @property
    def active_fraction(self) -> float:
        """Fraction of masked weights kept (from the header; 1.0 when there are none)."""
        n = self.numel
        return sum(t.active for t in self.tensors) / n if n else 1.0

    def per_layer_active(self) -> dict[str, float]:
        """Active fraction of each masked tensor (from the header)."""
        return {t.name: (t.active / t.numel if t.numel else 1.0) for t in self.tensors}

    @property
    def extras_bytes(self) -> int:
        """Stored (compressed) size of the extras; 0 when the file has none."""
        return self._info.extras.length if self._info.extras is not None else 0

    def _data(self) -> bytes:
        return container.read_data(self.path, self._info)

    @functools.cached_property
    def extras(self) -> dict[str, torch.Tensor]:
        """The extras (head, BN statistics ...) as a model takes them; ``{}`` when the file has none.
        A quantised head (``head_bits``) comes dequantised to float32.

        Refuses extras over ``container.MAX_EXTRAS_DECODED`` bytes: see :meth:`read_extras`.
        """
        return self.read_extras()

    def read_extras(self, *, max_bytes: int | None = None,
                    dequantize: bool = True) -> dict[str, torch.Tensor]:
        """Decode the extras.

        Args:
            max_bytes: refuse, before decompressing, extras that declare more bytes than this
                (default ``container.MAX_EXTRAS_DECODED``, 64 MiB; decoding costs about twice that).
            dequantize: turn a quantised ``head.weight`` (int8 / packed uint8 with
                ``head.weight_scale``, docs/format.md) into the float32 head a model takes; False
                gives the tensors as stored (to write them again unchanged).

        Returns:
            ``{name: tensor}``; ``{}`` when the file has none.

        Raises:
            FormatError: a damaged blob, or a quantised head without a valid scale or metadata.
        """
        if self._info.extras is None:
            return {}
        limit = container.MAX_EXTRAS_DECODED if max_bytes is None else int(max_bytes)
        container.check_extras_size(self._info.extras, limit, self.path)  # before reading the blob
        stored = container.read_blob(self.path, self._info, self._info.extras, "extras")
        raw = container.decode_extras(stored, self._info.extras, self.path, limit)
        from safetensors.torch import load as st_load

        try:
            stored = st_load(raw)
        except Exception as exc:  # safetensors raises its own error types on malformed blobs
            raise FormatError(f"{self.path}: extras are not a valid safetensors blob ({exc})") from exc
        return decode_head(stored, self.metadata, self.path) if dequantize else stored

    def check_backbone(self, backbone) -> None:
        """Raise :class:`BackboneMismatchError` unless ``backbone`` has the hash stored in the file."""
        _check_hash(self, _hash_of(backbone), _name_of(backbone))

    def masks(self, backbone=None, *, check_hash: bool = True,
              max_elements: int | None = None) -> dict[str, torch.Tensor]:
        """Decode all masks.

        Every shape is checked against the backbone, and the total against ``max_elements``,
        before any payload is read or decompressed.

        Args:
            backbone: the backbone the file was made for; required for the ``ans`` codec (its
                weights are the coder's contexts), optional otherwise (then shapes come from the header).
            check_hash: verify the backbone's hash first.
            max_elements: the most mask elements to decode in total (one byte of memory each).
                Default: ``container.MAX_DECODED_ELEMENTS`` (2^27), or 8 times the backbone's
                element count when that is larger. Raise it for a trusted file that declares more.

        Returns:
            ``{parameter name: BoolTensor}`` in file order.
        """
        cod = get_codec(self.codec)
        if backbone is None and cod.needs_backbone:
            raise FormatError(f"{self.path}: codec {self.codec!r} needs the backbone to decode masks: "
                              f"call masks(load_backbone({self.backbone_name!r}))")
        weights, bb_hash = None, None
        if backbone is not None:
            if check_hash:
                self.check_backbone(backbone)
                bb_hash = self.backbone_hash
            weights = _tensors(_module(backbone))
            self._check_fit(weights)
        if max_elements is None:
            max_elements = container.default_budget(sum(w.numel() for w in (weights or {}).values()))
        container.check_budget(self.tensors, int(max_elements), self.path)
        data = self._data()
        out = {}
        for t in self.tensors:
            absw = None
            if weights is not None and cod.needs_backbone:
                base = _storage_name(t.name)
                absw = _contexts(bb_hash, base, weights[base])
            payload = container.blob(self.path, data, t, f"tensor {t.name!r}")
            flat = cod.decode(payload, t.numel, absw)
            if int(np.count_nonzero(flat)) != t.active:
                raise FormatError(f"{self.path}: mask {t.name!r} decodes to {int(np.count_nonzero(flat))} "
                                  f"active entries, the header says {t.active}")
            out[t.name] = torch.from_numpy(flat.reshape(t.shape))
        return out

    def _check_fit(self, weights: dict[str, torch.Tensor]) -> None:
        """Every mask must have the shape of its backbone tensor (checked before decoding any)."""
        for t in self.tensors:
            w = weights.get(t.name.rsplit("/", 1)[-1])
            if w is None or tuple(w.shape) != t.shape:
                raise FormatError(f"{self.path}: mask {t.name!r} {list(t.shape)} does not fit the backbone "
                                  f"({'missing' if w is None else list(w.shape)})")

    def verify(self, backbone=None, *, max_elements: int | None = None) -> None:
        """Check every checksum and the extras; decode all masks given the backbone (or a non-ans codec).

        Args:
            backbone: the backbone the file was made for (needed to decode ``ans`` masks).
            max_elements: as in :meth:`masks`.
        """
        data = self._data()
        for t in self.tensors:
            container.blob(self.path, data, t, f"tensor {t.name!r}")
        del data
        _ = self.extras
        if backbone is not None or not get_codec(self.codec).needs_backbone:
            self.masks(backbone, max_elements=max_elements)


def _check_hash(mf: MaskFile, actual: str, given_name: str) -> None:
    if actual != mf.backbone_hash:
        raise BackboneMismatchError(
            f"{mf.path} was made for backbone {mf.backbone_name!r} (sha256 {mf.backbone_hash}), but the "
            f"given backbone {given_name!r} has sha256 {actual}: load it with the backbone it was trained on "
            "(trained on a local weights file: backbone=load_backbone(name, weights=PATH), CLI "
            "--backbone-weights PATH)",
            expected=mf.backbone_hash, actual=actual, backbone_name=mf.backbone_name)


def read(path: str | os.PathLike) -> MaskFile:
    """Open a ``.mask`` file: read and validate its header only.

    Raises:
        FormatError: malformed, truncated or corrupted file. CodecError: unknown codec.
    """
    return MaskFile(path, container.parse(path))


def _resolve_backbone(backbone, mf: MaskFile):
    if backbone is None or isinstance(backbone, str):
        from .backbones import load_backbone

        return load_backbone(backbone or mf.backbone_name)
    return backbone


def _refuse_cascade(mf: MaskFile) -> None:
    if mf.metadata.get("cascade.format"):
        raise FormatError(f"{mf.path} holds a cascade (dispatcher + experts), not a single task: "
                          "load it with maskpack.load_cascade(path, backbone)")


def load(path: str | os.PathLike, backbone=None) -> TaskModel:
    """Load a ``.mask`` file as a plain, rehydrated :class:`TaskModel` (eval mode).

    Args:
        path: the ``.mask`` file.
        backbone: a :class:`maskpack.Backbone`, an ``nn.Module``, a registry name, or None to
            load the backbone named in the file. A backbone built from a local weights file is
            given as ``load_backbone(mf.backbone_name, weights=PATH)``; its hash is checked.

    Raises:
        BackboneMismatchError: the backbone's hash differs from the one stored in the file.

    Example:
        >>> model = load("task.mask")        # doctest: +SKIP
        >>> logits = model(images)
    """
    from .rehydrate import rehydrate

    mf = read(path)
    _refuse_cascade(mf)
    bb = _resolve_backbone(backbone, mf)
    masks = mf.masks(bb)
    return rehydrate(bb, masks, mf.extras, scale=mf.scale)


def load_task_into(host, path: str | os.PathLike) -> TaskModel:
    """Switch a :class:`maskpack.rehydrate.TaskHost` to the task stored in ``path``, in place.

    The hash and the ans contexts use the host's pristine weights (the host keeps a copy of every
    tensor a task changed), so tasks can be switched in any order.
    """
    mf = read(path)
    _refuse_cascade(mf)
    pristine = host.pristine_state()
    _check_hash(mf, state_dict_hash(pristine), "<TaskHost backbone>")

    class _Pristine(nn.Module):  # a view of the pristine tensors for the decoder's contexts
        def named_parameters(self, *a, **k):
            return iter(pristine.items())

    masks = mf.masks(_Pristine(), check_hash=False)
    return host.switch_(masks, mf.extras, scale=mf.scale)


def load_task(path: str | os.PathLike, backbone) -> tuple[TaskModel, dict[str, str]]:
    """Load a trained task: a ``.mask`` file, a fine-tune's ``model.safetensors``, or a run directory.

    Args:
        path: the task file, or a run directory holding ``task.mask`` or ``model.safetensors``.
        backbone: the :class:`maskpack.Backbone` it was trained on.

    Returns:
        The :class:`TaskModel` (eval mode) and the task's metadata (may be empty).

    Raises:
        FormatError: a run directory without a finished task, or a fine-tune of another backbone.
    """
    from .rehydrate import build_head

    path = Path(path)
    if path.is_dir():
        for name in ("task.mask", "model.safetensors"):
            if (path / name).exists():
                return load_task(path / name, backbone)
        raise FormatError(f"run directory {path} holds no task.mask or model.safetensors yet "
                          "(is training finished? `maskpack train --resume --out DIR` finishes it)")
    if not path.exists():
        raise FileNotFoundError(2, "No such file", str(path))
    if path.suffix != ".safetensors":
        return load(path, backbone), dict(read(path).metadata)
    state, meta = load_finetuned(path)
    model = TaskModel(backbone.copy_model(), build_head(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"{path} does not match backbone {backbone.name!r}: {exc}") from exc
    return model.eval(), meta
