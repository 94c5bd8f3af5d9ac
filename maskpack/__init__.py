"""maskpack: store fine-tuned vision models as binary masks over one frozen backbone."""

from .backbones import Backbone, load_backbone
from .backbones.hashing import backbone_hash
from .cascade import load_cascade
from .io import MaskFile, load, read, save

__version__ = "0.1.0"

__all__ = ["Backbone", "MaskFile", "__version__", "backbone_hash", "load", "load_backbone", "load_cascade",
           "read", "save"]
