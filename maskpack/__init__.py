"""maskpack: store fine-tuned vision models as binary masks over one frozen backbone."""

from .backbones import Backbone, load_backbone
from .backbones.hashing import backbone_hash

__version__ = "0.1.0"

__all__ = ["Backbone", "__version__", "backbone_hash", "load_backbone"]
