"""Files a command reads (a payload, an input, a captured delivery, a key): a real `falhook`
process given one that is too big, endless or nested too deeply prints one line and exits
2, never a RecursionError or MemoryError traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from falhook.receiver.cli.dev import KEY_FILE
from falhook.verify.testing import generate_keypair, jwks_document
from tests.receiver.test_cli_errors import falhook_cli, one_line

EXIT_USAGE = 2
DEPTH = 100_000  # far past Python's recursion limit


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    path = tmp_path / "deep.json"
    path.write_text("[" * DEPTH + "]" * DEPTH)
    return path


@pytest.fixture
def deep_object(tmp_path: Path) -> Path:
    path = tmp_path / "deep-headers.json"
    path.write_text('{"a": ' + "[" * DEPTH + "]" * DEPTH + "}")
    return path


@pytest.fixture
def key(tmp_path: Path) -> Path:
    assert falhook_cli("keygen", "--out", str(tmp_path / "keys"), cwd=tmp_path).returncode == 0
    return tmp_path / "keys" / KEY_FILE


def test_send_a_payload_nested_too_deeply(tmp_path: Path, deep: Path, key: Path) -> None:
    # The URL is never contacted: the payload is refused first.
    result = falhook_cli(
        "send", "http://127.0.0.1:9/x", "--key", str(key), "--payload", str(deep), cwd=tmp_path
    )
    one_line(result, EXIT_USAGE, str(deep), "nested too deeply")


def test_submit_an_input_nested_too_deeply(tmp_path: Path, deep: Path) -> None:
    (tmp_path / "falhook.db").touch()  # the input is read once the store is found
    argv = ["submit", "fal-ai/flux/dev", "--input", str(deep), "--fal-key", "k"]
    argv += ["--queue-url", "http://127.0.0.1:9"]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, str(deep), "nested too deeply")


def test_verify_headers_nested_too_deeply(tmp_path: Path, deep_object: Path) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b"{}")
    result = falhook_cli("verify", "--headers", str(deep_object), "--body", str(body), cwd=tmp_path)
    one_line(result, EXIT_USAGE, str(deep_object), "nested too deeply")


@pytest.mark.parametrize("flag", ["--headers", "--body"])
def test_verify_an_endless_file(tmp_path: Path, flag: str) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"{}")
    files = {"--headers": str(small), "--body": str(small), flag: "/dev/zero"}
    argv = ["verify", *(x for pair in files.items() for x in pair), "--keys", str(small)]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, flag, "/dev/zero", "larger than")


def test_verify_a_keys_file_too_big(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"{}")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(jwks_document(generate_keypair(b"\x01" * 32))) + " " * 2**21)
    argv = ["verify", "--headers", str(small), "--body", str(small), "--keys", str(keys)]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, "--keys", "larger than")


def test_send_an_endless_payload(tmp_path: Path, key: Path) -> None:
    argv = ["send", "http://127.0.0.1:9/x", "--key", str(key), "--payload", "/dev/zero"]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, "--payload", "/dev/zero", "larger than")


def test_submit_an_endless_input(tmp_path: Path) -> None:
    (tmp_path / "falhook.db").touch()
    argv = ["submit", "fal-ai/flux/dev", "--input", "/dev/zero", "--fal-key", "k"]
    argv += ["--queue-url", "http://127.0.0.1:9"]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, "--input", "/dev/zero", "larger than")


def test_send_a_key_file_too_big(tmp_path: Path, key: Path) -> None:
    big = tmp_path / "big-key.json"
    big.write_bytes(key.read_bytes() + b" " * 2**21)
    argv = ["send", "http://127.0.0.1:9/x", "--key", str(big)]
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, "--key", "larger than")
