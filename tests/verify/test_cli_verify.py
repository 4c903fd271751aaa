"""`falhook verify`: verdicts, header file formats and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from falhook.receiver.cli import main
from falhook.verify.testing import JWKSServer, KeyPair, fal_body, jwks_document, sign

NOW = 1_752_019_770


@pytest.fixture
def files(tmp_path: Path, keypair: KeyPair) -> dict[str, Path]:
    body = fal_body("req-1")
    headers = sign(body, "req-1", "user-1", NOW, keypair=keypair)
    (tmp_path / "body.json").write_bytes(body)
    (tmp_path / "headers.json").write_text(json.dumps(headers))
    dump = "POST /webhooks/fal HTTP/1.1\nHost: example\n" + "".join(
        f"{k}: {v}\n" for k, v in headers.items()
    )
    (tmp_path / "headers.txt").write_text(dump)
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_document(keypair)))
    return {p.stem + p.suffix: p for p in tmp_path.iterdir()}


def _run(files: dict[str, Path], *extra: str, headers: str = "headers.json") -> int:
    return main(
        [
            "verify",
            "--headers",
            str(files[headers]),
            "--body",
            str(files["body.json"]),
            "--keys",
            str(files["jwks.json"]),
            "--now",
            str(NOW),
            *extra,
        ]
    )


@pytest.mark.parametrize("headers", ["headers.json", "headers.txt"])
def test_authentic_delivery_exits_0(
    files: dict[str, Path], headers: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON headers and a pasted request dump both work."""
    assert _run(files, headers=headers) == 0
    out = capsys.readouterr().out
    assert "authentic: request_id=req-1 user_id=user-1 timestamp=1752019770" in out


def test_not_authentic_exits_1_with_reason(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A stale delivery reports its reason."""
    assert _run(files, "--now", str(NOW + 301)) == 1
    assert "NOT authentic: timestamp_too_old" in capsys.readouterr().out
    assert _run(files, "--user-id", "someone-else", "--json") == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["authentic"] is False and verdict["reason"] == "user_mismatch"


def test_json_output(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints a machine-readable verdict."""
    assert _run(files, "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict == {
        "authentic": True,
        "request_id": "req-1",
        "user_id": "user-1",
        "timestamp": NOW,
    }


def test_missing_files_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Unreadable inputs are usage errors."""
    files["headers.json"] = files["body.json"].with_name("nope.json")
    assert _run(files) == 2
    assert "cannot read the --headers file" in capsys.readouterr().err


def test_bad_headers_json_exits_2(files: dict[str, Path], tmp_path: Path) -> None:
    """A headers file that looks like JSON but is not is a usage error."""
    (tmp_path / "headers.json").write_text("{not json")
    assert _run(files) == 2


def test_unusable_keys_exit_3(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A keys file with no usable key cannot decide: exit 3 with a clear message."""
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    assert _run(files) == 3
    assert "keys unavailable" in capsys.readouterr().err


def test_jwks_url_from_a_server(files: dict[str, Path], keypair: KeyPair) -> None:
    """--jwks-url fetches keys; an outage on a cold cache is exit 3."""
    body = files["body.json"].read_bytes()
    now = int(time.time())
    files["headers.json"].write_text(json.dumps(sign(body, "r", "u", now, keypair=keypair)))
    base = ["verify", "--headers", str(files["headers.json"]), "--body", str(files["body.json"])]
    with JWKSServer(keypair) as server:
        assert main([*base, "--jwks-url", server.url]) == 0
    with JWKSServer(keypair) as down:
        down.fail(503)
        assert main([*base, "--jwks-url", down.url]) == 3


def test_keys_unavailable_is_one_line_on_stderr(files: dict[str, Path], keypair: KeyPair) -> None:
    """Run as a user runs it (no logging configured, unlike under pytest): the failed
    fetch is said once, by the command, not also by the JWKS client's warning."""
    base = ["verify", "--headers", str(files["headers.json"]), "--body", str(files["body.json"])]
    with JWKSServer(keypair) as down:
        down.fail(503)
        command = [sys.executable, "-m", "falhook.receiver", *base, "--now", str(NOW)]
        done = subprocess.run(
            [*command, "--jwks-url", down.url],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keys unavailable, cannot decide:"), lines
