"""The task model: a (masked or rehydrated) backbone feature extractor plus an optional head."""

from __future__ import annotations

import torch
from torch import nn


class TaskModel(nn.Module):
    """``head(backbone(x))``.

    State-dict names are ``backbone.<name>`` and ``head.<name>``; a ``.mask`` file's extras use
    these names, its masks use the backbone's own parameter names (no ``backbone.`` prefix).
    With no head (self-supervised masks) the model returns the backbone's features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, F)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
