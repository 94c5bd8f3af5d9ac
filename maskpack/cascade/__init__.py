"""Cascades: a self-supervised dispatcher mask, an unsupervised router, one expert mask per cluster.

The paper's model cascade (Warmerdam et al., "Self-Masking Networks"), see docs/cascade.md.

* :mod:`.model`: :class:`CascadeModel` (loading needs neither scikit-learn nor the trainer);
* :mod:`.format`: :func:`save_cascade`, :func:`load_cascade`, :func:`is_cascade`;
* :mod:`.fit`: router and combination fitting (scikit-learn);
* :mod:`.train`: :func:`train_cascade`, :class:`CascadeConfig`, :func:`evaluate_cascade`.

The training names are imported on first use, so ``import maskpack`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .format import CODEC, FORMAT, FORMAT_VERSION, is_cascade, load_cascade, read_cascade, save_cascade
from .model import MODES, CascadeModel

_LAZY = {
    "fit_router": "fit", "fit_combination": "fit",
    "CascadeConfig": "train", "CascadeResult": "train", "train_cascade": "train",
    "evaluate_cascade": "train", "default_train_config": "train", "load_dispatcher": "train",
    "_expert_config": "train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CODEC", "FORMAT", "FORMAT_VERSION", "MODES", "CascadeModel", "is_cascade", "load_cascade",
           "read_cascade", "save_cascade", *[n for n in _LAZY if not n.startswith("_")]]
