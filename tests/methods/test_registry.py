"""The method registry: ``register_method`` files a class under its ``name``; ``get_method`` finds it or raises a
``ConfigError`` naming the key, the closest registered name and every registered one."""

import pytest

from mobyssl.errors import ConfigError
from mobyssl.methods import MoBY, registry


@pytest.fixture
def methods(monkeypatch):
    """A registry of two methods, replacing the real one for the test."""

    class Other:
        name = "simclr"

    table = {"moby": MoBY, "simclr": Other}
    monkeypatch.setattr(registry, "METHODS", table)
    return table


def test_moby_is_registered_under_its_name():
    """Importing the methods package registers MoBY as ``moby``."""
    assert registry.METHODS["moby"] is MoBY
    assert registry.get_method("moby") is MoBY


def test_register_method_files_the_class_under_its_name_and_returns_it(methods):
    """``@register_method`` keeps the class usable and makes ``get_method(cls.name)`` return it."""

    @registry.register_method
    class Tiny:
        name = "tiny"

    assert Tiny.name == "tiny" and methods["tiny"] is Tiny
    assert registry.get_method("tiny") is Tiny
    assert registry.get_method("simclr") is methods["simclr"]


def test_unknown_method_suggests_the_closest_name(methods):
    """A misspelt name raises a ConfigError with the single closest registered name and the sorted list."""
    with pytest.raises(ConfigError) as err:
        registry.get_method("simcrl")
    assert str(err.value) == ("unknown method 'simcrl' (config key method.name). Did you mean 'simclr'? "
                              "Available: moby, simclr.")


def test_unknown_method_with_no_close_name_lists_the_available_ones(methods):
    """A name like none registered raises a ConfigError without a suggestion."""
    with pytest.raises(ConfigError) as err:
        registry.get_method("xyz")
    assert str(err.value) == "unknown method 'xyz' (config key method.name). Available: moby, simclr."
