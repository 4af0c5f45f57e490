"""Self-supervised methods; importing this package registers them."""

from .base import Method
from .dino import DINO
from .esvit import EsViT
from .moby import MoBY
from .mocov3 import MoCoV3
from .registry import METHODS, get_method, register_method
from .sit import SiT

__all__ = ["DINO", "EsViT", "Method", "MoBY", "MoCoV3", "SiT", "METHODS", "get_method", "register_method"]
