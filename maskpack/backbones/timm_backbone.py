"""``timm:<name>`` backbones (optional dependency: ``pip install 'maskpack[timm]'``).

The name is ``timm:<model>`` with an optional query of ``timm.create_model`` keyword
arguments, e.g. ``timm:resnet50``, ``timm:convnext_tiny``,
``timm:vit_small_patch16_224?img_size=32`` (timm resamples the position embeddings) or
``timm:vit_small_patch16_224?dynamic_img_size=true``. ``weights=none`` builds a randomly
initialised network (seeded). The whole name, query included, is stored in ``.mask`` files, so
a loader rebuilds the same architecture.

Weights come from timm (the local Hugging Face cache, or downloaded), or from a local file
(``weights=PATH``): the network is then built without pretrained weights, the file goes through
the architecture's timm checkpoint filter (the conversion timm applies to its own pretrained
files: key renames, position-embedding resampling) and is loaded strictly.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from . import Backbone, InputSizeCheck, freeze
from .weights import load_weights_file, read_state_dict

# create_model arguments maskpack sets itself.
_RESERVED = ("pretrained", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
             "features_only", "cache_dir")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def import_timm():
    """Import timm, or raise a :class:`BackboneError` that says how to install it."""
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise BackboneError("timm backbones need the package timm: pip install 'maskpack[timm]' "
                            "(or pip install timm)") from exc
    return timm


def _value(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(raw)
    return raw


def parse_name(name: str) -> tuple[str, dict[str, Any], bool]:
    """Split ``timm:<model>?k=v&k2=v2`` into the model name, create_model kwargs and "random init".

    Raises:
        BackboneError: a malformed query or a reserved argument.
    """
    arch, _, query = name.removeprefix("timm:").partition("?")
    if not arch:
        raise BackboneError(f"backbone {name!r}: give a timm model name, e.g. 'timm:resnet50'")
    kwargs: dict[str, Any] = {}
    random_init = False
    for item in filter(None, query.split("&")):
        key, sep, raw = item.partition("=")
        if not sep or not _KEY.match(key):
            raise BackboneError(f"bad option {item!r} in backbone {name!r}: use key=value pairs "
                                "joined by '&'")
        if key in _RESERVED:
            raise BackboneError(f"option {key!r} in backbone {name!r} is set by maskpack; remove it "
                                "(local weights: weights=PATH / --backbone-weights PATH)")
        if key == "weights":
            if raw.lower() != "none":
                raise BackboneError(f"backbone {name!r}: only 'weights=none' goes in the name; give a "
                                    "weights file with weights=PATH (CLI: --backbone-weights PATH)")
            random_init = True
            continue
        kwargs[key] = _value(raw)
    return arch, kwargs, random_init


def _download_hint(timm, arch: str) -> str:
    try:
        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
    except Exception:  # an unknown tag or an older timm: the hint is optional
        hub_id = None
    where = f" (https://huggingface.co/{hub_id}, model.safetensors)" if hub_id else ""
    return ("Connect to the internet once (the weights stay in the Hugging Face cache), or download "
            f"the weights file elsewhere{where} and pass it with weights=PATH "
            "(CLI: --backbone-weights PATH)")


def _create(timm, name: str, arch: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm model {arch!r} in {name!r}; see timm.list_models('pattern*')")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random init (weights=none) is the same every time
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise BackboneError(f"timm model {arch!r} does not take the option(s) {sorted(kwargs)} "
                            f"given in {name!r}: {exc}") from exc
    except Exception as exc:  # download, cache or hub failure: name the cause and the fix
        if not pretrained:
            raise BackboneError(f"timm could not build {name!r}: {type(exc).__name__}: {exc}") from exc
        raise BackboneError(f"could not get pretrained weights for {name!r} ({type(exc).__name__}: "
                            f"{str(exc)[:300]}). {_download_hint(timm, arch)}") from exc


def _detach(net: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    classifier = net.get_classifier()
    net.reset_classifier(0)  # forward() now returns the pooled, pre-logits features
    if not isinstance(classifier, nn.Module) or not any(True for _ in classifier.parameters()):
        classifier = None  # none, or a distilled pair of heads: no single ImageNet classifier
    return net, classifier


def _classifier_names(net: nn.Module) -> tuple[str, ...]:
    names = getattr(net, "pretrained_cfg", {}).get("classifier")
    if isinstance(names, str):
        return (names,)
    return tuple(names or ())


def _filter(net: nn.Module, state: dict[str, torch.Tensor], path: str, name: str) -> dict[str, torch.Tensor]:
    """timm's own conversion of a checkpoint for this architecture (``checkpoint_filter_fn``)."""
    fn = getattr(sys.modules.get(type(net).__module__), "checkpoint_filter_fn", None)
    if not callable(fn):
        return state
    try:
        return fn(state, net)
    except Exception as exc:  # a third-party conversion: report it against the file
        raise BackboneError(f"weights file {path}: timm's checkpoint conversion for {name!r} failed "
                            f"({type(exc).__name__}: {exc})") from exc


def _input(net: nn.Module, name: str, kwargs: dict[str, Any], data_cfg: dict[str, Any]) -> int:
    """The input side, and a size check on networks that take only that size (ViTs)."""
    h, w = (int(s) for s in data_cfg["input_size"][-2:])
    img = kwargs.get("img_size")
    if isinstance(img, int):
        h = w = img
    fixed = bool(net.pretrained_cfg.get("fixed_input_size", False)) and not kwargs.get("dynamic_img_size")
    if fixed:
        sep = "&" if "?" in name else "?"
        hint = (f", or build it for your size: '{name}{sep}img_size=N' (timm resamples the position "
                f"embeddings) or '{name}{sep}dynamic_img_size=true'")
        net.register_forward_pre_hook(InputSizeCheck(name, (h, w), hint))
    return h


def load_timm(name: str, weights: str | os.PathLike | None = None) -> Backbone:
    """Build ``timm:<model>[?options]`` as a frozen backbone.

    Args:
        name: the registry name (``timm:resnet50``, ``timm:vit_small_patch16_224?img_size=32`` ...).
        weights: a local weights file (safetensors or a weights_only state dict), or None for
            timm's pretrained weights.

    Returns:
        The :class:`Backbone`: its ImageNet classifier detached (``num_classes=0``), input size and
        normalisation from timm's data config, feature width ``head_hidden_size`` (or
        ``num_features``).
    """
    timm = import_timm()
    arch, kwargs, random_init = parse_name(name)
    if random_init and weights is not None:
        raise BackboneError(f"backbone {name!r} asks for random weights (weights=none) and a weights "
                            f"file {os.fspath(weights)}: give one of them")
    net = _create(timm, name, arch, kwargs, pretrained=not random_init and weights is None)
    if weights is not None:
        path = os.fspath(weights)
        state = _filter(net, read_state_dict(path), path, name)
        net, classifier = load_weights_file(net, state, path=path, what=name,
                                            classifier=_classifier_names(net), detach=_detach)
    else:
        net, classifier = _detach(net)
    data_cfg = timm.data.resolve_model_data_config(net)
    size = _input(net, name, kwargs, data_cfg)
    feat = int(getattr(net, "head_hidden_size", None) or net.num_features)
    mean = tuple(float(v) for v in data_cfg["mean"])
    std = tuple(float(v) for v in data_cfg["std"])
    if len(mean) != 3 or len(std) != 3:
        raise BackboneError(f"backbone {name!r} takes {len(mean)}-channel images; maskpack feeds RGB: "
                            "use a 3-channel model")
    return Backbone(name, freeze(net), feat, size, mean, std,
                    freeze(classifier) if classifier is not None else None,
                    weights=os.fspath(weights) if weights is not None else None)
