"""Which part of the network a cascade's experts adapt: their masked tensors and BN layers.

An expert is trained from the dispatcher's scores over the same masked tensors as the
dispatcher (so the file can store it as XOR deltas), but only the tensors chosen by
``expert_layers`` learn: the others keep the dispatcher's scores, hence its mask, and their
deltas are all zero (a 1-byte ``ans`` payload each). With ``expert_bn="adapt"`` the BN layers
right after the trained tensors adapt to the cluster (under ``bn_mode masked``; other BN modes
keep their own rule); with ``"frozen"`` the expert uses the dispatcher's BN statistics
everywhere and stores none of its own.

The scope is applied by a ``train_start`` callback of :func:`maskpack.train.run` (no trainer
change): the frozen score tensors stop requiring gradients (SGD skips them), the adapting BN
list is narrowed, and a fresh expert starts from the dispatcher's extras (BN statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import masking
from ..bn import bn_after
from ..errors import ConfigError

DEFAULT_EXPERT_LAYERS = "last:3"
EXPERT_BN = ("adapt", "frozen")


def expert_tensors(spec: str, names: list[str]) -> list[str]:
    """The masked tensors the experts train.

    Args:
        spec: ``all`` or ``last:N`` (the last N of ``names``; N larger than their number means all).
        names: the dispatcher's masked tensor names, in backbone order.

    Returns:
        The chosen names, in backbone order.

    Raises:
        ConfigError: a malformed spec.
    """
    if spec == "all":
        return list(names)
    count = spec.removeprefix("last:") if spec.startswith("last:") else ""
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"bad --expert-layers {spec!r}: use all or last:N with N >= 1")
    return list(names[-int(count):])


def check_expert_bn(mode: str) -> str:
    """``mode`` itself, or ConfigError naming the choices."""
    if mode not in EXPERT_BN:
        raise ConfigError(f"unknown --expert-bn {mode!r}: use {' or '.join(EXPERT_BN)}")
    return mode


def expert_scope(trainable: list[str], bn: str, dispatcher_extras: dict[str, torch.Tensor] | None
                 ) -> Callable[[str, dict[str, Any]], None]:
    """A ``train_start`` callback that limits an expert run to its scope.

    Args:
        trainable: the masked tensors the expert trains (the others' scores are frozen).
        bn: ``adapt`` or ``frozen`` (see the module docstring).
        dispatcher_extras: the dispatcher's extras (TaskModel names) to start from; None on a
            resumed run (its checkpoint holds the expert's own).
    """
    keep = set(trainable)

    def cb(event: str, info: dict[str, Any]) -> None:
        if event != "train_start":
            return
        s = info["state"]
        net = s.model.backbone
        scores = masking.score_masks(net)
        unknown = sorted(keep - set(scores))
        if unknown:
            raise ConfigError(f"expert tensors {unknown[:3]} are not masked by the dispatcher")
        for name, sm in scores.items():
            sm.scores.requires_grad_(name in keep)
        if bn == "frozen":
            s.parts.adapt_bn_names = []
        elif s.config.bn_mode == "masked":
            s.parts.adapt_bn_names = bn_after(net, {n.rpartition(".")[0] for n in keep})
        if dispatcher_extras:
            own = s.model.state_dict()
            with torch.no_grad():
                for name, t in dispatcher_extras.items():
                    if name in own and own[name].shape == t.shape:
                        own[name].copy_(t)

    return cb
