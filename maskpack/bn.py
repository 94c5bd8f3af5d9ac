"""BatchNorm policies: which BN layers adapt during training, and re-estimating their statistics.

Modes (``TrainConfig.bn_mode``):

* ``train``: every BN layer uses batch statistics while training (re-estimated before evaluation);
* ``frozen``: every BN layer stays in eval mode with the backbone's statistics;
* ``head``: only the last BN layer (the one before the pooled features) adapts;
* ``masked``: the BN layer right after each masked layer adapts; the rest keep the backbone's
  statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .model import TaskModel
from .runtime import autocast

BN_MODES = ("train", "frozen", "head", "masked")
BatchNorm = nn.modules.batchnorm._BatchNorm


def last_bn_name(model: nn.Module) -> str | None:
    """Name of the last BatchNorm layer in module order (Lite0 / Lite2: the conv head's ``_bn1``,
    which normalises the pre-activations of the pooled features), or None without BN."""
    names = [n for n, m in model.named_modules() if isinstance(m, BatchNorm)]
    return names[-1] if names else None


def bn_after(model: nn.Module, owners: set[str]) -> list[str]:
    """Names of the BatchNorm layers that first follow each module in ``owners`` (module order:
    a conv's own BN in EfficientNet and ResNet blocks)."""
    out, pending = [], False
    for name, m in model.named_modules():
        if name in owners:
            pending = True
        elif pending and isinstance(m, BatchNorm):
            out.append(name)
            pending = False
    return out


def adapting_bn_names(model: nn.Module, mode: str, masked_owners: set[str], *,
                      backbone: str = "") -> list[str]:
    """The BN layers that adapt under ``mode`` (``[]`` for ``train`` / ``frozen``: all or none).

    Args:
        model: the backbone module.
        mode: one of :data:`BN_MODES`.
        masked_owners: names of the modules whose parameters are masked (for ``masked``).
        backbone: the backbone's name, for the error message.

    Raises:
        ConfigError: ``head`` / ``masked`` but no BN layer qualifies.
    """
    if mode not in BN_MODES:
        raise ConfigError(f"unknown BN mode {mode!r}: use one of {', '.join(BN_MODES)}")
    names: list[str] = []
    if mode == "head":
        names = [n for n in [last_bn_name(model)] if n is not None]
    elif mode == "masked":
        names = bn_after(model, masked_owners)
    # a backbone without any BatchNorm (ViT, ConvNeXt) has nothing to adapt: head / masked are no-ops
    if mode in ("head", "masked") and not names and last_bn_name(model) is not None:
        raise ConfigError(f"--bn-mode {mode}: backbone {backbone!r} has no BatchNorm layer to adapt"
                          f"{' after a masked layer' if mode == 'masked' else ''}; "
                          "use --bn-mode train or frozen")
    return names


def set_train_mode_(model: nn.Module, mode: str, adapting: Sequence[nn.Module]) -> None:
    """Put ``model`` in train mode with the BN policy ``mode``: under anything but ``train`` every
    BN layer is in eval mode except the ``adapting`` ones."""
    model.train()
    if mode != "train":
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.eval()
        for m in adapting:
            m.train()


def _features_of(model: nn.Module):
    return model.features if isinstance(model, TaskModel) else model


@torch.no_grad()
def reestimate_bn_(model: nn.Module, loader, *, device: str | torch.device = "cpu",
                   max_batches: int = 100, amp: bool = True,
                   only: Sequence[nn.Module] | None = None) -> int:
    """Recompute BatchNorm running statistics as a cumulative average over ``loader`` (in place).

    Only the BN layers being re-estimated run in train mode (all of them, or those in ``only``);
    everything else stays in eval mode.

    Returns:
        The number of batches used (0 when there is no BatchNorm to re-estimate).
    """
    device = torch.device(device)
    pool = list(model.modules()) if only is None else list(only)
    bns = [m for m in pool if isinstance(m, BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    model.eval()
    saved = []
    for m in bns:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    feats_fn = _features_of(model)
    n = 0
    for images, _ in loader:
        if n >= max_batches:
            break
        images = images.to(device, non_blocking=True)
        with autocast(device, amp):
            feats_fn(images)
        n += 1
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was_training)
    return n


def bn_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of every BatchNorm buffer (running mean / var, batches tracked)."""
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm):
            out |= {f"{name}.{b}" for b, t in m._buffers.items() if t is not None}
    return out


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm buffer (to restore after a temporary re-estimation)."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in bn_buffer_names(model)}


@torch.no_grad()
def load_bn_state_(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the buffers saved by :func:`bn_state` back into ``model``."""
    own = model.state_dict()
    for k in bn_buffer_names(model):
        if k in state:
            own[k].copy_(state[k])
