"""The receiver package's public names: sorted, complete, and defined in the package."""

from __future__ import annotations

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
    import pytest

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
