"""Command-line interface: a thin click shell over the library.

Each command group lives in its own module and registers itself on :data:`main`; library
errors (:class:`maskpack.errors.MaskpackError`) become one ``Error: ...`` line and exit code 1.
"""

from __future__ import annotations

import functools
import json

import click

from .. import __version__
from ..errors import MaskpackError


def handle_errors(fn):
    """Turn MaskpackError (and missing files) into click's one-line ``Error:`` message."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaskpackError as exc:
            raise click.ClickException(str(exc)) from exc
        except FileNotFoundError as exc:
            raise click.ClickException(f"file not found: {exc.filename or exc}") from exc

    return wrapper


def parse_set(values: tuple[str, ...]) -> dict:
    """``--set key=value`` pairs for a TrainConfig; values are parsed as JSON when they can be
    (numbers, lists, booleans), else kept as strings."""
    from ..errors import ConfigError
    from ..train import TrainConfig

    names = set(TrainConfig.__dataclass_fields__)
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in names:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE with KEY one of the TrainConfig fields "
                              "(see docs/training.md)")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def recipe_help(key: str, what: str) -> str:
    """Help text for an option whose default comes from the recipe, generated from RECIPES so the
    stated defaults cannot drift from the code."""
    from ..train.config import recipe_defaults

    return f"{what} Default recipe: {recipe_defaults(key)}.".lstrip()


def backbone_weights_option(fn):
    """The ``--backbone-weights PATH`` option shared by every command that takes ``--backbone``."""
    return click.option(
        "--backbone-weights", default=None, type=click.Path(exists=True, dir_okay=False),
        help="Local weights file for the backbone (safetensors, or a state dict torch.load("
             "weights_only=True) reads): the architecture is built without downloading and loads "
             "this file (docs/backbones.md).")(fn)


def backbone_from(name: str | None, weights: str | None, stored: str | None = None):
    """What library calls take for ``--backbone NAME --backbone-weights PATH``.

    Args:
        name: ``--backbone`` (None: the stored name).
        weights: ``--backbone-weights`` (None: ``name`` is passed on, loaded by the library).
        stored: the name a task file records, used when ``name`` is None.

    Returns:
        ``name`` when there is no weights file, else the loaded :class:`maskpack.Backbone`.
    """
    if weights is None:
        return name
    from ..backbones import DEFAULT_BACKBONE, load_backbone

    return load_backbone(name or stored or DEFAULT_BACKBONE, weights=weights)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="maskpack")
def main() -> None:
    """maskpack: fine-tuned vision models as small binary masks over one frozen backbone.

    \b
    Example:
        maskpack bench                       # mask vs fine-tune storage on the embedded default
        maskpack train --dataset digits --out runs/digits
        maskpack inspect runs/digits/task.mask
    """


def _register() -> None:
    # Each module adds its commands to `main`; a module that is missing is skipped so partial
    # installs still give a working CLI.
    import importlib

    for mod in ("storage_cmds", "train_cmds", "bench_cmds", "cascade_cmds"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


_register()
