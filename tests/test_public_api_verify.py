"""The verify package exports exactly its public names, from inside the package."""

from __future__ import annotations

from falhook import verify


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted and lists every public name the package defines."""
    assert verify.__all__ == sorted(verify.__all__)
    public = {name for name in dir(verify) if not name.startswith("_")}
    submodules = {"errors", "jwks", "keys", "message", "signature", "sources", "testing"}
    assert set(verify.__all__) - {"__version__"} == public - submodules


def test_exports_come_from_the_package() -> None:
    """Each exported object is defined inside verify (one home per exception)."""
    for name in verify.__all__:
        if name == "__version__":
            continue
        module = getattr(verify, name).__module__
        assert module == "falhook.verify" or module.startswith("falhook.verify."), name


def test_version_is_a_string() -> None:
    """__version__ is exported."""
    assert isinstance(verify.__version__, str)
