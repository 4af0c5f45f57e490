"""mobyssl: self-supervised pre-training of vision transformers (MoBY with Swin / DeiT backbones)."""

__version__ = "0.1.0"


def _import_methods() -> None:
    """The config's method discovery: importing the methods package registers each method's options."""
    import importlib

    importlib.import_module(f"{__name__}.methods")


def _wire() -> None:
    from . import config

    config.method_discovery = _import_methods


_wire()
