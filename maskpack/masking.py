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

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError

FilterFn = Callable[[nn.Module, str], bool]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_ATTN_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_MAX_FUSED = 2**24  # float32 counts kept weights exactly up to here


class _MaskedWeight(torch.autograd.Function):
    """W * (M * 1/alpha) with the straight-through gradient dL/dS := dL/dM, in one node.

    The forward is :func:`masked_weight`'s arithmetic (so baking is bit-identical); the backward
    is written out by hand, with no host synchronisation (the all-zero case is a multiply by
    ``count > 1``, not a Python branch). With ``MI = M * inv``:

        dL/dM_j = g_j W_j inv  -  0.5 inv^2 / n * sum_i(g_i W_i MI_i)   (second term: via alpha)
    """

    @staticmethod
    def forward(ctx, weight, scores, mask, scale: bool, detach_alpha: bool):  # noqa: ARG004
        mf = mask.to(weight.dtype)  # no copy when ScoreMask made it in this dtype
        ctx.scale, ctx.detach_alpha, ctx.inv_numel = scale, detach_alpha, 1.0 / max(mf.numel(), 1)
        if not scale:
            ctx.save_for_backward(weight, mf)
            return weight * mf
        count = _count(mf)
        inv = _inverse_alpha_from_count(count, ctx.inv_numel)
        scale_mask = mf * inv  # _scaled's inner product, kept for the backward
        ctx.save_for_backward(weight, scale_mask, count, inv)
        return weight * scale_mask

    @staticmethod
    def backward(ctx, grad):
        weight, scale_mask = ctx.saved_tensors[:2]  # scale_mask: M * inv (or M without scaling)
        grad_w = grad * scale_mask if ctx.needs_input_grad[0] else None
        gw = grad * weight  # dL/d(M * 1/alpha)
        if not ctx.scale:
            return grad_w, gw, None, None, None
        count, inv = ctx.saved_tensors[2:]
        if ctx.detach_alpha:
            return grad_w, gw.mul_(inv), None, None, None
        through_alpha = _dot(gw, scale_mask) * _alpha_coef(count, inv, ctx.inv_numel)
        return grad_w, torch.addcmul(through_alpha, gw, inv, out=gw), None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one pass when both are dense in the same order, else via a product."""
    if _same_layout(a, b) and _dense(a):
        n = a.numel()
        return torch.dot(a.as_strided((n,), (1,)), b.as_strided((n,), (1,)))
    return (a * b).sum()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides wherever a dimension has more than one element."""
    return a.shape == b.shape and all(
        n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride(), strict=True))


def _count(mask_float: torch.Tensor) -> torch.Tensor:
    """Number of kept weights, exact and rounded once to the mask's dtype."""
    if mask_float.numel() < _MAX_FUSED or mask_float.dtype == torch.float64:
        return mask_float.sum()  # integers below 2**24 add up exactly in float32
    return mask_float.sum(dtype=torch.float64).to(mask_float.dtype)


def _inverse_alpha_from_count(count: torch.Tensor, inv_numel: float | torch.Tensor) -> torch.Tensor:
    """1/sqrt(max(count, 1) / n): the one formula, elementwise, for one tensor or a vector of them."""
    return torch.rsqrt(torch.clamp(count, min=1.0) * inv_numel)


def _alpha_coef(count: torch.Tensor, inv: torch.Tensor, inv_numel: float | torch.Tensor) -> torch.Tensor:
    """The factor on sum(g W M inv) of the gradient through alpha: d(1/alpha)/d(count) / inv.

    That is -0.5 inv^2 / n, and zero where the count sits on its floor (count <= 1).
    """
    return inv.square() * (count > 1) * (inv_numel * -0.5)


def _scaled(weight: torch.Tensor, mask_float: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """W * (M * inv), in this order of operations (every path must round alike)."""
    return weight * (mask_float * inv)


def inverse_alpha(mask_float: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(mean(M)), with the count of kept weights clamped to 1 so an all-zero mask stays finite."""
    return _inverse_alpha_from_count(_count(mask_float), 1.0 / max(mask_float.numel(), 1))


def masked_weight(weight: torch.Tensor, mask_float: torch.Tensor, *, scale: bool = True,
                  detach_alpha: bool = False) -> torch.Tensor:
    """W * (M * (1/alpha)): the one definition used by training, baking and task switching.

    The per-layer training node (:class:`_MaskedWeight`) and :func:`compile_masks_`'s fused
    pass run this same arithmetic; tests pin them to ``torch.equal``.
    """
    if not scale:
        return weight * mask_float
    inv = inverse_alpha(mask_float.detach() if detach_alpha else mask_float)
    return _scaled(weight, mask_float, inv)


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
        self._fused: tuple | None = None  # set by compile_masks_'s forward pre-hook, for one forward

    def mask(self) -> torch.Tensor:
        """The current binary mask (bool, same shape as the weight)."""
        return mask_from_scores(self.scores.detach(), mode=self.mode, threshold=self.threshold, k=self.k)

    def _mask_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as 0/1 of ``dtype``; threshold mode writes it in one pass."""
        if self.mode != "threshold":
            return self.mask().to(dtype)
        s = self.scores.detach()
        return torch.gt(s, self.threshold, out=torch.empty_like(s, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        fused = self._fused
        if fused is not None and fused[1] is weight and fused[2:] == (
                weight._version, self.scores._version, torch.is_grad_enabled()):
            return fused[0]  # computed by the fused pass from these very tensors, this forward
        return _MaskedWeight.apply(weight, self.scores, self._mask_as(weight.dtype), self.scale,
                                   self.detach_alpha)

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


def _score_mask_owners(model: nn.Module) -> list[tuple[str, ScoreMask, nn.Module, str]]:
    """(parameter name, ScoreMask, owning module, local name) of every score mask, in module order."""
    out = []
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname, plist in module.parametrizations.items():
                full = f"{mod_name}.{pname}" if mod_name else pname
                out.extend((full, p, module, pname) for p in plist if isinstance(p, ScoreMask))
    return out


def score_masks(model: nn.Module) -> dict[str, ScoreMask]:
    """Map each masked parameter's name (as before masking) to its :class:`ScoreMask`."""
    return {name: sm for name, sm, _, _ in _score_mask_owners(model)}


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
    uncompile_masks_(model)
    for _, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for pname in list(module.parametrizations.keys()):
            if any(isinstance(p, ScoreMask) for p in module.parametrizations[pname]):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=True)


# -- one fused pass for all masked weights (compile_masks_) ------------------------------------------

_ROW = 512  # fused layout: every tensor starts on a row of this many elements


def _dense(t: torch.Tensor) -> bool:
    """True when ``t``'s strides cover exactly numel() consecutive elements, in any dimension order."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Bank:
    """Masked tensors of one configuration on one device, laid out in flat row-aligned buffers.

    Tensor i occupies ``flat[start_i : start_i + numel_i]`` in its weight's storage order (its
    segment is viewed with the weight's own strides), padded to whole rows of ``_ROW``: elementwise
    work on the flat buffer is elementwise work on every tensor, and per-tensor sums are row sums
    plus a short cumulative sum. Padding holds W = 0 and M = 0.
    """

    def __init__(self, masks: list[ScoreMask], weights: list[torch.Tensor]):
        self.masks, self.weights = masks, weights
        first = masks[0]
        self.mode, self.threshold, self.scale, self.detach_alpha = (
            first.mode, first.threshold, first.scale, first.detach_alpha)
        device = weights[0].device
        rows = [-(-w.numel() // _ROW) for w in weights]
        ends = list(itertools.accumulate(rows))
        self.starts = [(e - r) * _ROW for e, r in zip(ends, rows, strict=True)]
        self.size = ends[-1] * _ROW
        self.pads = [(s + w.numel(), e * _ROW) for s, w, e in zip(self.starts, weights, ends, strict=True)
                     if s + w.numel() < e * _ROW]  # the zero tail of each tensor's last row
        self.bounds = torch.tensor([e - r for e, r in zip(ends, rows, strict=True)] + ends, device=device)
        owner = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
        self.row_owner = owner.to(device)  # (rows,): which tensor each row belongs to
        self.inv_numel = torch.tensor([1.0 / w.numel() for w in weights], device=device)
        self.scores_flat = torch.full((self.size,), -math.inf, device=device)  # -inf: padding is masked
        self.score_views = self.views(self.scores_flat)
        self.weight_flat, self.weight_versions = torch.empty(0), None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's segment of ``flat``, shaped and strided like its weight."""
        off = flat.storage_offset()
        return [torch.as_strided(flat, w.shape, w.stride(), off + s)
                for w, s in zip(self.weights, self.starts, strict=True)]

    def weight_rows(self) -> torch.Tensor:
        """The frozen weights as (rows, _ROW), copied again only after one of them changed."""
        versions = tuple(w._version for w in self.weights)
        if versions != self.weight_versions:  # a new buffer: a graph may still hold the old one
            with torch.inference_mode(False):  # kept across calls: never an inference tensor
                flat = torch.zeros(self.size, dtype=self.weights[0].dtype, device=self.weights[0].device)
                torch._foreach_copy_(self.views(flat), [w.detach() for w in self.weights])
            self.weight_flat, self.weight_versions = flat, versions
        return self.weight_flat.view(-1, _ROW)

    def mask_rows(self, scores: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        """The masks as 0/1 floats, (rows, _ROW)."""
        device = self.scores_flat.device
        if self.mode == "threshold":
            torch._foreach_copy_(self.score_views, list(scores))
            flat = torch.gt(self.scores_flat, self.threshold, out=torch.empty(self.size, dtype=dtype,
                                                                               device=device))
        else:
            flat = torch.zeros(self.size, dtype=dtype, device=device)
            torch._foreach_copy_(self.views(flat), [sm.mask() for sm in self.masks])
        return flat.view(-1, _ROW)

    def per_tensor(self, row_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-tensor sums of per-row values: differences of a float64 cumulative sum (exact for counts)."""
        cums = torch.cumsum(row_values, 0, dtype=torch.float64)
        cums = torch.cat([cums.new_zeros(1), cums])[self.bounds].view(2, -1)
        return (cums[1] - cums[0]).to(dtype)


class _FusedMaskedWeights(torch.autograd.Function):
    """Every W * (M * 1/alpha) of a :class:`_Bank` in one node, with :class:`_MaskedWeight`'s gradient."""

    @staticmethod
    def forward(ctx, bank: _Bank, *tensors):
        w = bank.weight_rows()
        mf = bank.mask_rows(tensors[:len(bank.masks)], w.dtype)
        ctx.bank = bank
        ctx.set_materialize_grads(False)
        if not bank.scale:
            ctx.save_for_backward(w, mf)
            return tuple(bank.views((w * mf).view(-1)))
        count = bank.per_tensor(mf.sum(1), w.dtype)
        inv = _inverse_alpha_from_count(count, bank.inv_numel)
        inv_rows = inv[bank.row_owner].unsqueeze(1)
        scale_mask = mf * inv_rows  # _scaled's inner product, row by row
        ctx.save_for_backward(w, scale_mask, count, inv, inv_rows)
        return tuple(bank.views((w * scale_mask).view(-1)))

    @staticmethod
    def backward(ctx, *grads):
        bank, n = ctx.bank, len(ctx.bank.masks)
        w, scale_mask = ctx.saved_tensors[:2]
        g = torch.empty_like(w)
        views = bank.views(g.view(-1))
        used = [i for i, gi in enumerate(grads) if gi is not None]
        if used:  # strides of one-element dimensions aligned, so that the copy takes one kernel
            src = [grads[i].as_strided(grads[i].shape, views[i].stride())
                   if _same_layout(grads[i], views[i]) else grads[i] for i in used]
            torch._foreach_copy_([views[i] for i in used], src)
        unused = [i for i, gi in enumerate(grads) if gi is None]
        zero = [g.view(-1)[a:b] for a, b in bank.pads] + [views[i] for i in unused]
        if zero:  # padding and unused outputs: zero, or a NaN there would reach the cumulative sums
            torch._foreach_zero_(zero)
        out: list[torch.Tensor | None] = [None] * (2 * n)
        if any(ctx.needs_input_grad[n + 1:]):
            out[n:] = bank.views((g * scale_mask).view(-1))
        gw = g * w  # dL/d(M * 1/alpha)
        if bank.scale:
            count, inv, inv_rows = ctx.saved_tensors[2:]
            if bank.detach_alpha:
                gw.mul_(inv_rows)
            else:
                through = bank.per_tensor((gw * scale_mask).sum(1), w.dtype)
                through = through * _alpha_coef(count, inv, bank.inv_numel)  # (tensors,)
                torch.addcmul(through[bank.row_owner].unsqueeze(1), gw, inv_rows, out=gw)
        out[:n] = bank.views(gw.view(-1))
        for i in unused:  # no gradient reached that weight: None, as on the per-layer path
            out[i] = out[n + i] = None
        need = ctx.needs_input_grad[1:]
        return (None, *[o if need[i] else None for i, o in enumerate(out)])


class _FusedMasks:
    """The forward pre-hook and post-hook that :func:`compile_masks_` puts on a module."""

    def __init__(self, module: nn.Module):
        self.entries = [(sm, owner.parametrizations[pname])
                        for _, sm, owner, pname in _score_mask_owners(module)]
        self.banks: list[_Bank] = []
        self.layout: tuple | None = None
        self.hook_ids: tuple[int, int] = (-1, -1)

    def refresh(self) -> int:
        """(Re)build the banks when a tensor moved or a mask's settings changed; number fused."""
        pairs = [(sm, plist.original) for sm, plist in self.entries]
        layout = tuple((w.data_ptr(), sm.scores.data_ptr(), sm.mode, sm.threshold, sm.k, sm.scale,
                        sm.detach_alpha) for sm, w in pairs)
        if layout != self.layout:
            groups: dict[tuple, list] = {}
            for (sm, plist), (_, w) in zip(self.entries, pairs, strict=True):
                s = sm.scores
                if (len(plist) == 1 and w.dtype == s.dtype == torch.float32 and w.device == s.device
                        and 0 < w.numel() < _MAX_FUSED and _dense(w)):
                    key = (w.device, sm.mode, sm.threshold, sm.k, sm.scale, sm.detach_alpha)
                    groups.setdefault(key, []).append((sm, w))
            with torch.inference_mode(False):
                self.banks = [_Bank([sm for sm, _ in g], [w for _, w in g]) for g in groups.values()]
            self.layout = layout
        return sum(len(b.masks) for b in self.banks)

    def pre(self, module: nn.Module, args) -> None:  # noqa: ARG002
        self.refresh()
        grad = torch.is_grad_enabled()
        for bank in self.banks:
            outs = _FusedMaskedWeights.apply(bank, *[sm.scores for sm in bank.masks], *bank.weights)
            for sm, w, out in zip(bank.masks, bank.weights, outs, strict=True):
                sm._fused = (out, w, w._version, sm.scores._version, grad)

    def post(self, module: nn.Module, args, output) -> None:  # noqa: ARG002
        for sm, _ in self.entries:
            sm._fused = None


def compile_masks_(model: nn.Module) -> int:
    """Compute all of ``model``'s masked weights in one fused pass per forward call (in place).

    A forward pre-hook on ``model`` lays the fp32 scores and frozen weights of each mask
    configuration out in one flat buffer and computes every ``W * (M * 1/alpha)`` with a fixed
    number of operators (about 35 forward and backward together, whatever the number of masked
    tensors; the per-layer path takes 16 per tensor), no host synchronisation and the same bits
    as :func:`masked_weight`. Meant for GPUs, where a step is often launch-bound; on a CPU its
    extra copies make it slower than the per-layer path when the masks dominate. The gradients
    equal the per-layer path's within float rounding, but every score gradient arrives at the
    end of the backward pass (DDP cannot overlap their all-reduce with the backward).
    Parameters may move (``.to(device)``, channels_last) afterwards: the layout is rebuilt.
    Accessing a masked weight outside ``model``'s forward uses the per-layer path.

    Args:
        model: the module whose forward runs the masked layers (e.g. ``TaskModel.backbone``).

    Returns:
        The number of masked tensors in the fused pass; the others (not fp32, not dense,
        2**24 weights or more, or with other parametrizations) keep the per-layer path.

    Raises:
        ConfigError: ``model`` has no masks.
    """
    uncompile_masks_(model)
    fused = _FusedMasks(model)
    if not fused.entries:
        raise ConfigError("model has no score masks: call apply_masks_() before compile_masks_()")
    pre = model.register_forward_pre_hook(fused.pre)
    post = model.register_forward_hook(fused.post, always_call=True)
    fused.hook_ids = (pre.id, post.id)
    model.__dict__["_maskpack_fused"] = fused
    return fused.refresh()


def uncompile_masks_(model: nn.Module) -> None:
    """Remove what :func:`compile_masks_` installed on ``model`` or its submodules (in place)."""
    for module in model.modules():
        fused = module.__dict__.pop("_maskpack_fused", None)
        if fused is None:
            continue
        pre, post = fused.hook_ids
        module._forward_pre_hooks.pop(pre, None)
        module._forward_hooks.pop(post, None)
        module._forward_hooks_always_called.pop(post, None)
        fused.post(module, (), None)


# layer filters live in maskpack.layers (they choose what to mask); re-exported for callers
from .layers import LAYER_FILTERS, layer_filter  # noqa: E402,F401
