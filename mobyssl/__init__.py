"""mobyssl: self-supervised pre-training of vision transformers (MoBY with Swin / DeiT backbones)."""

__version__ = "0.1.0"
