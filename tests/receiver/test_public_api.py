"""The receiver package's public names: sorted, complete, and defined in the package."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import FunctionType

import pytest

from falhook import receiver


def test_all_is_sorted_and_unique() -> None:
    assert receiver.__all__ == sorted(receiver.__all__)
    assert len(set(receiver.__all__)) == len(receiver.__all__)


def test_all_equals_the_public_names() -> None:
    # The names load lazily (PEP 562): dir() lists them all, and each one resolves.
    public = {
        name
        for name in dir(receiver)
        if not name.startswith("_") and not isinstance(getattr(receiver, name), type(receiver))
    }
    assert set(receiver.__all__) == public


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        receiver.no_such_name  # noqa: B018


def test_exports_live_in_the_receiver_package() -> None:
    for name in receiver.__all__:
        obj = getattr(receiver, name)
        module = getattr(obj, "__module__", "")
        assert module.split(".")[:2] == ["falhook", "receiver"], (name, module)


def test_the_design_names_are_exported() -> None:
    for name in ("WebhookReceiver", "create_app", "Settings", "Delivery", "Retry"):
        assert name in receiver.__all__


SUBPACKAGES = sorted(p.parent.name for p in Path(receiver.__file__).parent.glob("*/__init__.py"))


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_each_subpackage_exports_a_curated_sorted_api_of_its_own(name: str) -> None:
    """Each subpackage's ``__init__`` names its public API: sorted, every name resolves,
    each defined inside that subpackage, and no other class or function of it is offered."""
    package = importlib.import_module(f"falhook.receiver.{name}")
    inside = f"falhook.receiver.{name}"
    exported = package.__all__
    assert exported == sorted(exported) and len(set(exported)) == len(exported)
    for public in exported:
        module = getattr(getattr(package, public), "__module__", "")
        assert module == inside or module.startswith(inside + "."), (public, module)
    offered = {
        attr
        for attr in dir(package)
        if not attr.startswith("_")
        and isinstance(getattr(package, attr), type | FunctionType)
        and getattr(package, attr).__module__.startswith(inside)
    }
    assert offered <= set(exported)


def test_the_subpackages_are_found() -> None:
    assert {"cli", "console", "recovery", "store"} <= set(SUBPACKAGES)
