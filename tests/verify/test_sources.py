"""Key sources: which are fetched, which are read from disk, which are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from falhook.verify.sources import jwks_file


def test_a_key_source_is_fetched_read_or_refused() -> None:
    # One rule for verify_signature and `falhook serve`: http(s) is fetched, a path or a
    # file:// URL is read here, and any other scheme is refused at once.
    assert jwks_file("https://rest.alpha.fal.ai/.well-known/jwks.json") is None
    assert jwks_file("HTTP://127.0.0.1:8000/jwks.json") is None
    assert jwks_file("file:///etc/falhook/jwks.json") == Path("/etc/falhook/jwks.json")
    assert jwks_file("./jwks.json") == Path("./jwks.json")
    for source in ("ftp://host/jwks.json", "s3://bucket/jwks.json"):
        with pytest.raises(ValueError, match="wants an http"):
            jwks_file(source)
