"""Storage layer: bit packing, mask codecs, the backbone-conditioned ANS coder and the ``.mask``
container. Plain numpy + stdlib + codec libraries; no torch here (see :mod:`maskpack.io`)."""

from .atomic import atomic_write, write_atomic
from .codecs import CODECS, DEFAULT_CODEC, GENERAL_CODECS, Codec, available_codecs, get_codec
from .container import Container, TensorEntry, build, parse

__all__ = ["CODECS", "DEFAULT_CODEC", "GENERAL_CODECS", "Codec", "Container", "TensorEntry",
           "atomic_write", "available_codecs", "build", "get_codec", "parse", "write_atomic"]
