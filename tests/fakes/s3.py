"""S3 for tests: moto's server mode (`ThreadedMotoServer`, a real S3 API server on
127.0.0.1, as s3fs's own tests use), started by a fixture; never a mocked client.

Import the fixtures into a conftest: ``from tests.fakes.s3 import s3_bucket, s3_server``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

__all__ = ["S3_ENV", "s3_bucket", "s3_server"]

# The standard AWS_* variables a test sets for the bucket (endpoint added by the fixture).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (ThreadedMotoServer), its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the moto server, with the standard AWS_* variables pointing there."""
    import boto3

    for name, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"falhook-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server
    return bucket
