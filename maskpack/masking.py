"""Score masking: learn which frozen weights to keep.

Each selected weight tensor ``W`` gets a score tensor ``S`` of the same shape. The mask is
``M = 1[S > threshold]`` (or the top-k fraction of ``S``) and the forward pass uses::

    W_eff = W * (M * (1 / alpha)),   alpha = sqrt(mean(M))

``alpha`` keeps the variance of the layer's output constant when weights are removed. When a
tensor's mask is all zeros ``mean(M)`` is clamped to ``1 / numel`` so the result is exactly zero
(no NaN). The gradient reaches ``S`` straight through the threshold: ``dL/dS := dL/dM``.

The masking is a :mod:`torch.nn.utils.parametrize` parametrization, so any parameter of any
module can be masked, including attention's ``in_proj_weight``. ``W`` stays frozen; only the
scores (and whatever else the trainer chooses) are trainable.

Example:
    >>> import torch.nn as nn
    >>> from maskpack import masking
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    >>> names = masking.apply_masks_(net)
    >>> names
    ['0.weight']
    >>> masks = masking.extract_masks(net)  # {'0.weight': BoolTensor(4, 4)}
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError

FilterFn = Callable[[nn.Module, str], bool]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_ATTN_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


class _MaskedWeight(torch.autograd.Function):
    """W * (M * 1/alpha) with the straight-through gradient dL/dS := dL/dM, in one node.

    Forward is computed by :func:`masked_weight` (so baking is bit-identical); backward is
    written out by hand, which saves autograd from keeping and revisiting five intermediate
    tensors per masked layer:

        dL/dM_j = g_j W_j inv  -  0.5 inv^3 / n * sum_i(g_i W_i M_i)   (second term: via alpha)
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, scale: bool, detach_alpha: bool):  # noqa: ARG004
        mf = mask.to(weight.dtype)
        out = masked_weight(weight, mf, scale=scale)
        ctx.scale, ctx.detach_alpha = scale, detach_alpha
        ctx.save_for_backward(weight, mf)
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, mf = ctx.saved_tensors
        gw = grad * weight  # dL/d(M * 1/alpha)
        grad_w = None
        if not ctx.scale:
            grad_s = gw
            if ctx.needs_input_grad[0]:
                grad_w = grad * mf
            return grad_w, grad_s, None, None, None
        n = max(mf.numel(), 1)
        mean = mf.mean()
        inv = torch.rsqrt(torch.clamp(mean, min=1.0 / n))
        grad_s = gw * inv
        if not ctx.detach_alpha and bool(mean > 1.0 / n):  # clamp passes no gradient at its floor
            grad_s = grad_s + (gw * mf).sum() * (-0.5 * inv**3 / n)
        if ctx.needs_input_grad[0]:
            grad_w = grad * (mf * inv)
        return grad_w, grad_s, None, None, None


def inverse_alpha(mask_float: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(mean(M)), with mean(M) clamped to 1/numel so an all-zero mask stays finite."""
    floor = 1.0 / max(mask_float.numel(), 1)
    return torch.rsqrt(torch.clamp(mask_float.mean(), min=floor))


def masked_weight(weight: torch.Tensor, mask_float: torch.Tensor, *, scale: bool = True,
                  detach_alpha: bool = False) -> torch.Tensor:
    """W * (M * (1/alpha)): the one definition used by training, baking and task switching."""
    if not scale:
        return weight * mask_float
    inv = inverse_alpha(mask_float.detach() if detach_alpha else mask_float)
    return weight * (mask_float * inv)


def mask_from_scores(scores: torch.Tensor, *, mode: str = "threshold", threshold: float = 0.0,
                     k: float = 0.9) -> torch.Tensor:
    """Binary mask of one score tensor: ``S > threshold``, or the top ``k`` fraction of ``S``."""
    if mode == "threshold":
        return scores > threshold
    if mode != "topk":
        raise ConfigError(f"unknown mask mode {mode!r}: use 'threshold' or 'topk'")
    n = scores.numel()
    keep = max(1, int(round(k * n)))
    out = torch.zeros(n, dtype=torch.bool, device=scores.device)
    out[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return out.view_as(scores)


def masks_from_scores(scores: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
    """Apply :func:`mask_from_scores` to every tensor of a ``{name: scores}`` checkpoint."""
    return {name: mask_from_scores(s, **kwargs).cpu() for name, s in scores.items()}


class ScoreMask(nn.Module):
    """Parametrization holding the scores of one weight tensor.

    Args:
        shape: shape of the masked weight.
        init: initial score S0 (paper: 1.0) for ``mode="threshold"``; for ``mode="topk"`` the
            scores start from a Kaiming-uniform draw (edge-popup) and ``init`` is ignored.
        threshold: mu, the mask is ``S > mu`` (paper: 0.0).
        mode: ``"threshold"`` (paper) or ``"topk"`` (Ramanujan et al., keep the top ``k`` fraction).
        k: fraction kept in ``"topk"`` mode.
        scale: divide by alpha = sqrt(mean(M)).
        detach_alpha: stop the gradient through alpha.
    """

    def __init__(self, shape: torch.Size, *, init: float = 1.0, threshold: float = 0.0,
                 mode: str = "threshold", k: float = 0.9, scale: bool = True,
                 detach_alpha: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        if mode not in ("threshold", "topk"):
            raise ConfigError(f"unknown mask mode {mode!r}: use 'threshold' or 'topk'")
        if mode == "topk" and not 0.0 < k <= 1.0:
            raise ConfigError(f"topk fraction k must be in (0, 1], got {k}")
        self.mode, self.threshold, self.k = mode, float(threshold), float(k)
        self.scale, self.detach_alpha = scale, detach_alpha
        if mode == "threshold":
            scores = torch.full(tuple(shape), float(init))
        else:
            fan_in = max(int(math.prod(shape[1:])), 1)
            bound = 1.0 / math.sqrt(fan_in)
            scores = torch.rand(tuple(shape), generator=generator) * (2 * bound) - bound
        self.scores = nn.Parameter(scores)

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, same shape as the weight)."""
        return mask_from_scores(self.scores.detach(), mode=self.mode, threshold=self.threshold, k=self.k)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _MaskedWeight.apply(weight, self.scores, self.mask(), self.scale, self.detach_alpha)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, threshold={self.threshold}, scale={self.scale}"


def default_filter(module: nn.Module, name: str) -> bool:
    """Conv and linear weights, and attention projection weights (``in_proj_weight`` ...)."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return leaf == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return leaf in _ATTN_WEIGHTS
    return False


def _with_bias(filter_fn: FilterFn) -> FilterFn:
    def fn(module: nn.Module, name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and leaf == "bias":
            return True
        if isinstance(module, nn.MultiheadAttention) and leaf == "in_proj_bias":
            return True
        return filter_fn(module, name)
    return fn


def select_parameters(model: nn.Module, filter_fn: FilterFn | None = None, *,
                      mask_bias: bool = False) -> list[tuple[str, nn.Module, str]]:
    """List (full name, owning module, local name) of the parameters that would be masked.

    Normalisation layers (BatchNorm, LayerNorm, GroupNorm) are never selected: masking them
    collapses accuracy (paper, Table 5).
    """
    fn = filter_fn or default_filter
    if mask_bias:
        fn = _with_bias(fn)
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            continue
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{pname}" if mod_name else pname
            if fn(module, full):
                out.append((full, module, pname))
    return out


def apply_masks_(model: nn.Module, filter_fn: FilterFn | None = None, *, mask_bias: bool = False,
                 init: float = 1.0, threshold: float = 0.0, mode: str = "threshold",
                 k: float = 0.9, scale: bool = True, detach_alpha: bool = False,
                 seed: int = 0) -> list[str]:
    """Put a :class:`ScoreMask` on every selected parameter of ``model`` (in place).

    The masked weights are frozen (``requires_grad=False``); everything else keeps its flag, so
    freeze the rest of the backbone yourself if it must not train.

    Args:
        model: any module; typically the backbone's feature extractor.
        filter_fn: ``filter_fn(module, parameter_name) -> bool``; default :func:`default_filter`.
        mask_bias: also mask conv/linear biases.
        init, threshold, mode, k, scale, detach_alpha: see :class:`ScoreMask`.
        seed: seeds the top-k score initialisation.

    Returns:
        The names of the masked parameters, in module order.
    """
    if is_masked(model):
        raise ConfigError("model already has masks: call strip_masks_() or use a fresh copy")
    gen = torch.Generator().manual_seed(seed)
    names = []
    for full, module, pname in select_parameters(model, filter_fn, mask_bias=mask_bias):
        param = getattr(module, pname)
        param.requires_grad_(False)
        sm = ScoreMask(param.shape, init=init, threshold=threshold, mode=mode, k=k, scale=scale,
                       detach_alpha=detach_alpha, generator=gen).to(param.device)
        parametrize.register_parametrization(module, pname, sm, unsafe=True)
        names.append(full)
    if not names:
        raise ConfigError("no parameter matched the mask filter: nothing to mask")
    return names


def score_masks(model: nn.Module) -> dict[str, ScoreMask]:
    """Map each masked parameter's name (as before masking) to its :class:`ScoreMask`."""
    out: dict[str, ScoreMask] = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for pname, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, ScoreMask):
                    out[f"{mod_name}.{pname}" if mod_name else pname] = p
    return out


def is_masked(model: nn.Module) -> bool:
    """True when ``model`` carries at least one :class:`ScoreMask`."""
    return bool(score_masks(model))


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The score tensors, for the optimizer (no weight decay: it breaks Theorem 1 and 2)."""
    return [sm.scores for sm in score_masks(model).values()]


@torch.no_grad()
def extract_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current masks as ``{parameter name: BoolTensor}`` on the CPU."""
    return {name: sm.mask().cpu() for name, sm in score_masks(model).items()}


@torch.no_grad()
def extract_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """Current scores as ``{parameter name: FloatTensor}`` on the CPU (a copy)."""
    return {name: sm.scores.detach().cpu().clone() for name, sm in score_masks(model).items()}


@torch.no_grad()
def load_scores_(model: nn.Module, scores: dict[str, torch.Tensor]) -> None:
    """Copy scores into a masked model (e.g. to start experts from a dispatcher)."""
    sms = score_masks(model)
    missing = sorted(set(sms) - set(scores))
    if missing:
        raise ConfigError(f"scores missing for masked parameters: {missing[:5]}")
    for name, sm in sms.items():
        if scores[name].shape != sm.scores.shape:
            raise ConfigError(f"score tensor {name!r} has shape {tuple(scores[name].shape)}, "
                              f"expected {tuple(sm.scores.shape)}")
        sm.scores.copy_(scores[name])


def active_fraction(model_or_masks) -> float:
    """Fraction of masked weights that are kept (1.0 when nothing is masked)."""
    masks = model_or_masks if isinstance(model_or_masks, dict) else extract_masks(model_or_masks)
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    return sum(int(m.sum()) for m in masks.values()) / total


def per_layer_active(model_or_masks) -> dict[str, float]:
    """Active fraction of each masked tensor."""
    masks = model_or_masks if isinstance(model_or_masks, dict) else extract_masks(model_or_masks)
    return {n: (float(m.float().mean()) if m.numel() else 1.0) for n, m in masks.items()}


@torch.no_grad()
def strip_masks_(model: nn.Module) -> None:
    """Bake W*M/alpha into plain parameters and remove all score parametrizations (in place)."""
    for _, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for pname in list(module.parametrizations.keys()):
            if any(isinstance(p, ScoreMask) for p in module.parametrizations[pname]):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)


# ----------------------------------------------------------------------------- layer filters


def _is_pointwise(module: nn.Module, name: str) -> bool:
    if isinstance(module, nn.Linear):
        return default_filter(module, name)
    if isinstance(module, nn.Conv2d):
        return default_filter(module, name) and module.kernel_size == (1, 1) and module.groups == 1
    return False


def _not_depthwise(module: nn.Module, name: str) -> bool:
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
        return False
    return default_filter(module, name)


LAYER_FILTERS: dict[str, FilterFn] = {
    "all": default_filter,
    "pointwise": _is_pointwise,
    "no-depthwise": _not_depthwise,
}


def layer_filter(spec: str, model: nn.Module) -> FilterFn:
    """A mask filter from a name: ``all``, ``pointwise``, ``no-depthwise``, ``no-stem``
    (all but the first masked tensor), ``last`` (only the last one: Lite0's conv head, the
    layer before the pooled features) or ``last:N`` (the last N; Lite0's ``last:13`` is blocks
    12-15 and the conv head), ``no-stem+pointwise`` style combinations, or
    ``re:REGEX`` (parameter names that match)."""
    if spec.startswith("re:"):
        try:
            pat = re.compile(spec[3:])
        except re.error as exc:
            raise ConfigError(f"bad layer regex {spec[3:]!r}: {exc}") from exc
        return lambda m, n: default_filter(m, n) and bool(pat.search(n))
    fns = []
    for part in spec.split("+"):
        if part == "no-stem" or part == "last" or part.startswith("last:"):
            names = [n for n, _, _ in select_parameters(model)]
            if part == "no-stem":
                first = names[0] if names else None
                fns.append(lambda m, n, first=first: default_filter(m, n) and n != first)
            else:
                count = part.partition(":")[2] or "1"
                if not count.isdigit() or int(count) < 1:
                    raise ConfigError(f"bad layer filter {part!r}: use last or last:N with N >= 1")
                keep = set(names[-int(count):])
                fns.append(lambda m, n, keep=keep: default_filter(m, n) and n in keep)
        elif part in LAYER_FILTERS:
            fns.append(LAYER_FILTERS[part])
        else:
            known = sorted(LAYER_FILTERS) + ["last", "last:N", "no-stem", "re:REGEX"]
            raise ConfigError(f"unknown layer filter {part!r}: use one of {known} (join with '+')")
    return lambda m, n: all(f(m, n) for f in fns)
