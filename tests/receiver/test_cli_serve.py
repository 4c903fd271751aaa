"""`falhook serve` argument handling: flags win over env, bad values exit 2 cleanly."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from falhook.receiver.cli import build_parser, main
from falhook.receiver.cli.common import settings_from_args


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALHOOK_LEASE_SECONDS", "9")
    monkeypatch.setenv("FALHOOK_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("FALHOOK_CALLBACK", "from.env:cb")
    args = _parse("--lease-seconds", "1.5", "--callback", "a:b", "--callback", "c:d")
    settings = settings_from_args(args)
    assert settings.lease_seconds == 1.5
    assert settings.max_body_bytes == 2048
    assert settings.callbacks == ("a:b", "c:d")


def test_forward_to_and_host_port() -> None:
    args = _parse("--forward-to", "http://127.0.0.1:9000/in", "--host", "0.0.0.0", "--port", "9")
    assert settings_from_args(args).forward_to == "http://127.0.0.1:9000/in"
    assert args.host == "0.0.0.0" and args.port == 9


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--lease-seconds", "abc"], "--lease-seconds"),
        (["--callback-max-attempts", "0"], "--callback-max-attempts"),
        (["--forward-to", "ftp://x/y"], "--forward-to"),
        (["--callback", "no_such_module_xyz:fn"], "no_such_module_xyz"),
        (["--database-url", "mysql://x"], "--database-url"),
    ],
)
def test_bad_values_exit_2_with_one_clear_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert err.startswith("falhook serve: ")
    assert "Traceback" not in err


def test_bad_env_value_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FALHOOK_LEASE_SECONDS", "soon")
    assert main(["serve"]) == 2
    assert "FALHOOK_LEASE_SECONDS" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_lease_seconds_abc_in_a_real_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "serve", "--lease-seconds", "abc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--lease-seconds 'abc': wants a number of seconds" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--no-such-flag"])
    assert info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def _serve_help() -> str:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return str(subparsers.choices["serve"].format_help())


def _sections(text: str) -> dict[str, list[str]]:
    """The help's sections (a line ending in ':' at column 0) and the flags listed in each."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  --"):
            current.append(line.split()[0] + " " + line.split()[1])
    return sections


def test_every_setting_declares_a_topic_and_says_what_it_takes() -> None:
    import dataclasses

    from falhook.receiver.settings import GROUPS, Settings, shown_metavar

    for field in dataclasses.fields(Settings):
        assert field.metadata["group"] in GROUPS, field.name
        assert shown_metavar(field) != "VALUE", field.name
    metavars = {f.name: shown_metavar(f) for f in dataclasses.fields(Settings)}
    assert metavars["lease_seconds"] == "SECONDS"
    assert metavars["max_body_bytes"] == "BYTES"
    assert metavars["queue_url"] == metavars["database_url"] == "URL"
    assert metavars["concurrency"] == "N"
    assert metavars["retention"] == "DURATION"


def test_serve_help_groups_the_flags_by_topic_in_order() -> None:
    text = _serve_help()
    sections = _sections(text)
    topics = [title for title in sections if title not in ("options", "usage")]
    expected = ["listening", "store", "keys", "callbacks", "limits", "recovery", "archive"]
    assert topics == [*expected, "console", "notifications", "logging"]
    assert "--archive-url URL" in sections["archive"]
    assert sections["listening"][:2] == ["--host HOST", "--port PORT"]
    assert "--callback MODULE:FUNCTION" in sections["callbacks"]
    assert "--forward-to URL" in sections["callbacks"]
    assert "--lease-seconds SECONDS" in sections["callbacks"]
    assert "--max-body-bytes BYTES" in sections["limits"]
    assert "--database-url URL" in sections["store"]
    assert "--jwks-url URL|FILE" in sections["keys"]
    assert "--log-level LEVEL" in sections["logging"]
    assert "--console-token TOKEN" in sections["console"]
    assert "--fal-key KEY" in sections["recovery"]
    assert "VALUE" not in text
    assert text.splitlines()[0].startswith("usage: falhook serve [--host HOST]")
    # Every flag appears once, under one topic.
    flags = [flag for listed in sections.values() for flag in listed]
    assert len(flags) == len(set(flags))


def test_a_store_command_lists_its_one_setting_with_its_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "deliveries", "list", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--database-url URL" in _sections(out)["options"]
