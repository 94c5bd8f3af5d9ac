"""Layer filters: which weights of a backbone get masked, by name (``TrainConfig.mask_layers``)."""

from __future__ import annotations

import re

from torch import nn

from .errors import ConfigError
from .masking import FilterFn, default_filter, select_parameters


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
