"""The `falhook` entry point: subcommands, exit codes, one-line user errors."""

from __future__ import annotations

import argparse

import pytest

from falhook.receiver.cli import build_parser, main, positive_int


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(actions[0].choices) >= {
        "serve",
        "deliveries",
        "prune",
        "keygen",
        "send",
        "demo",
        "verify",
    }


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["serve", "--port", "x"]])
def test_bad_arguments_exit_2_without_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("falhook") and err.count("\n") == 1
    assert "Traceback" not in err


def test_command_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--callback", "no_such_module_xyz:handle"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("falhook serve: ")
    assert "\n" not in err


@pytest.mark.parametrize(("text", "ok"), [("1", True), ("10", True), ("0", False), ("x", False)])
def test_positive_int(text: str, ok: bool) -> None:
    if ok:
        assert positive_int(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(text)
