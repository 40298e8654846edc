"""lazy(): a module proxy that imports on first attribute access, then answers like the module."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deltatune.lazy import lazy

FIRST_ACCESS = """
import sys
from deltatune.lazy import lazy

assert "colorsys" not in sys.modules, "pick another module: this interpreter imports colorsys at start-up"
colorsys = lazy("colorsys")
assert "colorsys" not in sys.modules  # creating the proxy imports nothing
assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
assert "colorsys" in sys.modules
assert colorsys.rgb_to_hsv is sys.modules["colorsys"].rgb_to_hsv
print("ok")
"""


def test_the_module_is_imported_on_first_attribute_access_only():
    result = subprocess.run([sys.executable, "-c", FIRST_ACCESS], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_after_first_access_names_are_plain_attributes_of_the_proxy():
    json = lazy("json")
    assert json.dumps([1]) == "[1]"
    import json as real

    assert vars(json)["dumps"] is real.dumps and vars(json)["loads"] is real.loads  # copied: no lookup per call
    assert json.__name__ == "json"


def test_classes_isinstance_and_class_attributes():
    fractions, decoder = lazy("fractions"), lazy("json.decoder")
    half = fractions.Fraction(1, 2)
    assert isinstance(half, fractions.Fraction)
    assert fractions.Fraction.from_float(0.5) == half
    assert issubclass(decoder.JSONDecodeError, ValueError)  # a submodule by its dotted name


def test_names_added_later_come_from_the_real_module_and_missing_ones_raise():
    import types

    real = types.ModuleType("lazy_test_module")
    sys.modules["lazy_test_module"] = real
    try:
        real.a = 1
        proxy = lazy("lazy_test_module")
        assert proxy.a == 1
        real.b = 2  # after the copy, e.g. a submodule imported later
        assert proxy.b == 2
        with pytest.raises(AttributeError):
            proxy.missing
    finally:
        del sys.modules["lazy_test_module"]


def test_an_unknown_module_fails_on_first_use():
    with pytest.raises(ModuleNotFoundError):
        lazy("no_such_module_deltatune").anything
