"""Training: supervised or SwAV masks (threshold or top-k), and full fine-tuning.

* :mod:`.config`: :class:`TrainConfig`, the named recipes, :func:`resolve_config`;
* :mod:`.build`: the model, the data loaders and the optimizer of a run;
* :mod:`.loop`: :func:`run`, the one training loop, and the :class:`RunState` callbacks see;
* :mod:`.state`: checkpoints, extras and the task file; :mod:`.evaluation`: metrics during training.

Example:
    >>> from maskpack.train import TrainConfig, run
    >>> result = run(TrainConfig(dataset="digits", epochs=2, image_size=32, out="runs/d"))  # doctest: +SKIP
    >>> result.metrics["accuracy"], result.task_path                                       # doctest: +SKIP
"""

from ..checkpoint import load_checkpoint
from ..masking import LAYER_FILTERS, layer_filter
from .config import METHODS, OBJECTIVES, RECIPES, TrainConfig, recipe_defaults, resolve_config
from .loop import RunState, TrainResult, lr_factor, resume_config, run

__all__ = ["LAYER_FILTERS", "METHODS", "OBJECTIVES", "RECIPES", "RunState", "TrainConfig", "TrainResult",
           "layer_filter", "load_checkpoint", "lr_factor", "recipe_defaults", "resolve_config",
           "resume_config", "run"]
