"""Rebuild a plain model from a backbone, masks and extras; switch tasks in place.

The baked weight of each masked tensor is computed with :func:`maskpack.masking.masked_weight`,
the very function the masked model uses in its forward pass, so eval-mode outputs of the
rehydrated model are bit-identical (``torch.equal``) to the trained masked model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import FormatError
from .masking import inverse_alpha, masked_weight
from .model import TaskModel


def _backbone_module(backbone) -> nn.Module:
    return getattr(backbone, "model", backbone)


def _resolve(root: nn.Module, name: str, what: str) -> tuple[nn.Module, str, torch.Tensor]:
    mod_name, _, leaf = name.rpartition(".")
    try:
        module = root.get_submodule(mod_name) if mod_name else root
    except AttributeError as exc:
        raise FormatError(f"{what} {name!r} does not exist in this backbone; was the mask made "
                          "for another architecture?") from exc
    tensor = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    if tensor is None:
        raise FormatError(f"{what} {name!r} does not exist in this backbone; was the mask made "
                          "for another architecture?")
    return module, leaf, tensor


def _check_mask(name: str, mask: torch.Tensor, target: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise FormatError(f"mask {name!r} has dtype {mask.dtype}, expected torch.bool")
    if tuple(mask.shape) != tuple(target.shape):
        raise FormatError(f"mask {name!r} has shape {tuple(mask.shape)} but the backbone's tensor "
                          f"has shape {tuple(target.shape)}")


def build_head(extras: dict[str, torch.Tensor]) -> nn.Module | None:
    """A linear head from ``head.weight`` / ``head.bias`` in extras, or None when absent."""
    w = extras.get("head.weight")
    if w is None:
        return None
    if not w.is_floating_point() or "head.weight_scale" in extras:
        raise FormatError(f"extra 'head.weight' ({w.dtype}) is a quantised head as stored (int8 / uint8 with "
                          "'head.weight_scale'): take the extras from MaskFile.extras, which dequantises it")
    if w.ndim != 2:
        raise FormatError(f"extra 'head.weight' must be 2-D (classes, features), got shape {tuple(w.shape)}")
    bias = extras.get("head.bias")
    head = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(w)
        if bias is not None:
            if tuple(bias.shape) != (w.shape[0],):
                raise FormatError(f"extra 'head.bias' has shape {tuple(bias.shape)}, "
                                  f"expected ({w.shape[0]},)")
            head.bias.copy_(bias)
    return head


@torch.no_grad()
def _apply_extras(model: TaskModel, extras: dict[str, torch.Tensor]) -> None:
    for key, value in extras.items():
        if key.startswith("head."):
            continue
        if not key.startswith("backbone."):
            raise FormatError(f"extra tensor {key!r} is neither 'backbone.*' nor 'head.*'")
        _, _, target = _resolve(model.backbone, key.removeprefix("backbone."), "extra tensor")
        if tuple(value.shape) != tuple(target.shape):
            raise FormatError(f"extra tensor {key!r} has shape {tuple(value.shape)}, the backbone's "
                              f"has {tuple(target.shape)}")
        target.copy_(value.to(target.dtype))


@torch.no_grad()
def rehydrate(backbone, masks: dict[str, torch.Tensor], extras: dict[str, torch.Tensor] | None = None,
              *, scale: bool = True) -> TaskModel:
    """Build a plain model with baked weights ``W * (M * 1/alpha)``.

    Args:
        backbone: a :class:`maskpack.Backbone` or its ``nn.Module``; it is not modified.
        masks: ``{parameter name: BoolTensor}`` in the backbone's naming.
        extras: trained tensors in :class:`TaskModel` naming (``head.weight``,
            ``backbone._bn0.running_mean`` ...).
        scale: whether the masks were trained with alpha scaling (the paper's default).

    Returns:
        A :class:`TaskModel` in eval mode with ``requires_grad=False``.
    """
    extras = extras or {}
    net = copy.deepcopy(_backbone_module(backbone))
    for name, mask in masks.items():
        module, leaf, target = _resolve(net, name, "masked tensor")
        _check_mask(name, mask, target)
        m = mask.to(device=target.device, dtype=target.dtype)
        baked = masked_weight(target, m, scale=scale)
        target.copy_(baked)
    model = TaskModel(net, build_head(extras))
    _apply_extras(model, extras)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TaskHost:
    """One loaded backbone that switches between tasks in place, without reloading it.

    It keeps a pristine copy of each tensor a task overwrites (only those), so a switch costs one
    multiply per masked weight plus copying the extras.

    Example:
        >>> host = TaskHost(load_backbone())           # doctest: +SKIP
        >>> host.switch_(masks_a, extras_a); host.model(x)
        >>> host.switch_(masks_b, extras_b); host.model(x)
    """

    def __init__(self, backbone, *, scale: bool = True):
        self.model = TaskModel(copy.deepcopy(_backbone_module(backbone))).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.scale = scale
        self._pristine: dict[str, torch.Tensor] = {}
        self._touched: set[str] = set()

    def pristine_state(self) -> dict[str, torch.Tensor]:
        """The backbone's own tensors (state-dict names), whatever task is loaded: the hash and the
        ``ans`` contexts of any task are computed on these."""
        return {**self.model.backbone.state_dict(), **self._pristine}

    def _original(self, name: str, target: torch.Tensor) -> torch.Tensor:
        if name not in self._pristine:
            self._pristine[name] = target.detach().clone()
        return self._pristine[name]

    @torch.no_grad()
    def switch_(self, masks: dict[str, torch.Tensor], extras: dict[str, torch.Tensor] | None = None,
                *, scale: bool | None = None) -> TaskModel:
        """Make ``self.model`` equal to ``rehydrate(backbone, masks, extras)``, in place."""
        extras = extras or {}
        scale = self.scale if scale is None else scale
        net = self.model.backbone
        touched = set()
        for name, mask in masks.items():
            _, _, target = _resolve(net, name, "masked tensor")
            _check_mask(name, mask, target)
            w0 = self._original(name, target)
            m = mask.to(device=target.device, dtype=target.dtype)
            if scale:
                torch.mul(w0, m.mul_(inverse_alpha(m)), out=target)
            else:
                torch.mul(w0, m, out=target)
            touched.add(name)
        for key, value in extras.items():
            if key.startswith("backbone."):
                name = key.removeprefix("backbone.")
                _, _, target = _resolve(net, name, "extra tensor")
                if tuple(value.shape) != tuple(target.shape):
                    raise FormatError(f"extra tensor {key!r} has shape {tuple(value.shape)}, "
                                      f"the backbone's has {tuple(target.shape)}")
                self._original(name, target)
                target.copy_(value.to(target.dtype))
                touched.add(name)
            elif not key.startswith("head."):
                raise FormatError(f"extra tensor {key!r} is neither 'backbone.*' nor 'head.*'")
        for name in self._touched - touched:  # undo what the previous task changed
            _, _, target = _resolve(net, name, "tensor")
            target.copy_(self._pristine[name])
        self._touched = touched
        head = build_head(extras)
        self.model.head = head.eval().requires_grad_(False) if head is not None else nn.Identity()
        return self.model
