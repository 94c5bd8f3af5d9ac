"""Local backbone weights: read a file safely and load it strictly into an architecture.

A weights file is either safetensors or a plain state dict that ``torch.load(...,
weights_only=True)`` accepts (never pickle). Common wrappers are unwrapped: a top-level
``state_dict`` or ``model`` entry holding the tensors, and a ``module.`` prefix on every key
(DistributedDataParallel).

A file may hold the architecture's ImageNet classifier or not: with it, the full network is
loaded and the classifier detached afterwards (it becomes ``Backbone.classifier``); without it,
the feature extractor alone is loaded. Either way every other tensor must match exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import BackboneError

# detach(net) -> (feature extractor, classifier): cuts the ImageNet head off a full network.
Detach = Callable[[nn.Module], tuple[nn.Module, nn.Module | None]]

_WRAPPERS = ("state_dict", "model")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    return len(head) == 9 and head[8:9] == b"{"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise BackboneError(f"weights file {path} holds {type(obj).__name__}, not a state dict of tensors: "
                            "save model.state_dict() (torch.save or safetensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise BackboneError(f"weights file {path}: entries {bad[:5]} are not tensors; save only "
                            "model.state_dict()")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects.

    Args:
        path: a ``.safetensors`` file, or a file written by ``torch.save(state_dict)``.

    Returns:
        ``{name: tensor}`` on the CPU.

    Raises:
        BackboneError: the file is missing, unreadable, or not a state dict of tensors.

    Example:
        >>> state = read_state_dict("resnet50.safetensors")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise BackboneError(f"backbone weights file {p} does not exist")
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(p), device="cpu"), p)
        except BackboneError:
            raise
        except Exception as exc:  # safetensors raises its own error types on malformed files
            raise BackboneError(f"weights file {p} is not a readable safetensors file "
                                f"({type(exc).__name__}: {_first_line(exc)})") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe (pickled objects) file
        raise BackboneError(f"weights file {p} is neither safetensors nor a state dict that "
                            f"torch.load(weights_only=True) accepts ({type(exc).__name__}: "
                            f"{_first_line(exc)}); save model.state_dict() instead") from exc
    return _unwrap(obj, p)


def _fmt(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
    return f"{keys[:5]}{more}"


def load_strict_(net: nn.Module, state: dict[str, torch.Tensor], *, path: str | os.PathLike,
                 what: str) -> None:
    """``net.load_state_dict(state, strict=True)`` with an error that names the file and the keys.

    Args:
        net: the module to fill (in place).
        state: the tensors read from ``path``.
        path: the weights file (for the message).
        what: the architecture's name (for the message).

    Raises:
        BackboneError: missing keys, unexpected keys or differing shapes.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"missing keys {_fmt(missing)}" if missing else "",
                 f"unexpected keys {_fmt(unexpected)}" if unexpected else "",
                 f"shapes differ (file vs model) {shapes[:3]}" if shapes else ""]
        raise BackboneError(f"weights file {os.fspath(path)} does not fit {what}: "
                            + "; ".join(p for p in parts if p))
    net.load_state_dict(state, strict=True)


def load_weights_file(net: nn.Module, state: dict[str, torch.Tensor], *, path: str | os.PathLike, what: str,
                      classifier: Sequence[str], detach: Detach) -> tuple[nn.Module, nn.Module | None]:
    """Load a state dict with or without the ImageNet classifier, then detach the classifier.

    Args:
        net: the full architecture (with its classifier), freshly built without pretrained weights.
        state: the file's tensors.
        path, what: the file and the architecture's name, for messages.
        classifier: the classifier's module names (``fc``, ``head.fc`` ...).
        detach: cuts the classifier off ``net``.

    Returns:
        ``(feature extractor, classifier)``; the classifier is None when the file has none.
    """
    prefixes = tuple(f"{c}." for c in classifier)
    if any(k.startswith(prefixes) for k in state):
        load_strict_(net, state, path=path, what=what)
        return detach(net)
    features, _ = detach(net)
    load_strict_(features, state, path=path, what=f"{what} (without its classifier)")
    return features, None
