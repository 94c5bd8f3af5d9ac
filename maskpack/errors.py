"""Exception hierarchy. Every error raised on bad input is a :class:`MaskpackError`.

The CLI turns any of these into one ``Error: ...`` line and a non-zero exit code.
"""

from __future__ import annotations


class MaskpackError(Exception):
    """Base class of all maskpack errors."""


class FormatError(MaskpackError):
    """A ``.mask`` file (or another input file) is malformed, truncated or corrupted."""


class BackboneMismatchError(MaskpackError):
    """A mask was made for a different backbone than the one given to load it."""

    def __init__(self, message: str, *, expected: str = "", actual: str = "", backbone_name: str = ""):
        super().__init__(message)
        self.expected = expected
        self.actual = actual
        self.backbone_name = backbone_name


class CodecError(MaskpackError):
    """A codec is unknown, unavailable, or its payload does not decode."""


class DataError(MaskpackError):
    """A dataset is missing, malformed, or a data option is invalid."""


class BackboneError(MaskpackError):
    """A backbone name is unknown or its weights cannot be obtained."""


class ConfigError(MaskpackError):
    """An option or combination of options is invalid."""
