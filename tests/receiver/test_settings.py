"""Settings: FALHOOK_* parsing, flags win over env, bad values name their variable."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from falhook.receiver import Settings, SettingsError
from falhook.receiver.settings import DEFAULT_DATABASE_URL, DEFAULT_JWKS_URL


def test_defaults_match_the_design() -> None:
    s = Settings.from_env({})
    assert s.database_url == DEFAULT_DATABASE_URL == "sqlite:///./falhook.db"
    assert s.jwks_url == DEFAULT_JWKS_URL == "https://rest.fal.ai/.well-known/jwks.json"
    assert s.user_id is None
    assert s.tolerance_seconds == 300
    assert s.max_body_bytes == 16 * 1024 * 1024
    assert s.callbacks == ()
    assert s.callback_max_attempts == 10
    assert s.callback_backoff_seconds == 2
    assert s.lease_seconds == 60
    assert s.forward_to is None


def test_reads_every_documented_variable() -> None:
    env = {
        "FALHOOK_DATABASE_URL": "sqlite:////tmp/x.db",
        "FALHOOK_JWKS_URL": "http://127.0.0.1:1/jwks.json",
        "FALHOOK_USER_ID": " user-1 ",
        "FALHOOK_TOLERANCE_SECONDS": "30",
        "FALHOOK_MAX_BODY_BYTES": "1024",
        "FALHOOK_CALLBACK": "a.b:c, d:e ,,",
        "FALHOOK_CALLBACK_MAX_ATTEMPTS": "3",
        "FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05",
        "FALHOOK_LEASE_SECONDS": "1.5",
        "FALHOOK_FORWARD_TO": "http://127.0.0.1:9/in",
    }
    s = Settings.from_env(env)
    assert s.database_url == "sqlite:////tmp/x.db"
    assert s.jwks_url == "http://127.0.0.1:1/jwks.json"
    assert s.user_id == "user-1"
    assert s.tolerance_seconds == 30.0
    assert s.max_body_bytes == 1024
    assert s.callbacks == ("a.b:c", "d:e")
    assert s.callback_max_attempts == 3
    assert s.callback_backoff_seconds == 0.05
    assert s.lease_seconds == 1.5
    assert s.forward_to == "http://127.0.0.1:9/in"


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FALHOOK_LEASE_SECONDS", "7")
    assert Settings.from_env().lease_seconds == 7.0


def test_empty_user_id_means_any_user() -> None:
    assert Settings.from_env({"FALHOOK_USER_ID": "  "}).user_id is None


def test_flags_win_over_env() -> None:
    env = {"FALHOOK_LEASE_SECONDS": "9", "FALHOOK_MAX_BODY_BYTES": "10"}
    s = Settings.from_env(env, lease_seconds=2.0, max_body_bytes=None)
    assert s.lease_seconds == 2.0
    assert s.max_body_bytes == 10  # a flag that was not given (None) leaves the env value


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FALHOOK_LEASE_SECONDS", "abc"),
        ("FALHOOK_LEASE_SECONDS", "0"),
        ("FALHOOK_LEASE_SECONDS", "-1"),
        ("FALHOOK_LEASE_SECONDS", "nan"),
        ("FALHOOK_LEASE_SECONDS", "inf"),
        ("FALHOOK_CALLBACK_BACKOFF_SECONDS", "soon"),
        ("FALHOOK_CALLBACK_MAX_ATTEMPTS", "0"),
        ("FALHOOK_CALLBACK_MAX_ATTEMPTS", "2.5"),
        ("FALHOOK_MAX_BODY_BYTES", "16MiB"),
        ("FALHOOK_TOLERANCE_SECONDS", "-5"),
        ("FALHOOK_JWKS_URL", "   "),
        ("FALHOOK_LOG_LEVEL", "loud"),
        ("FALHOOK_LOG_PAYLOADS", "maybe"),
        ("FALHOOK_FORWARDED_ALLOW_IPS", "garbage"),
        ("FALHOOK_FORWARDED_ALLOW_IPS", "10.0.0.1,proxy.internal"),
        ("FALHOOK_FORWARDED_ALLOW_IPS", " , "),
        ("FALHOOK_JWKS_URL", "ftp://example.com/jwks.json"),
        ("FALHOOK_JWKS_URL", "htps://rest.fal.ai/.well-known/jwks.json"),
        # fal is told this + /webhooks/fal: each of these would be a URL it cannot reach.
        ("FALHOOK_PUBLIC_URL", "https://hooks.example.com?x=1"),
        ("FALHOOK_PUBLIC_URL", "https://hooks.example.com/#frag"),
        ("FALHOOK_PUBLIC_URL", "https://hooks.example.com/webhooks/fal"),
    ],
)
def test_bad_values_raise_settings_error_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FALHOOK_DATABASE_URL", "mysql://x/y"),
        ("FALHOOK_FORWARD_TO", "ftp://example.com/in"),
    ],
)
def test_unusable_urls_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def test_good_proxy_lists_and_key_sources_are_kept() -> None:
    s = Settings.from_env(
        {
            "FALHOOK_FORWARDED_ALLOW_IPS": " 10.0.0.1, 10.1.0.0/16 ,::1,*",
            "FALHOOK_JWKS_URL": "file:///etc/falhook/jwks.json",
        }
    )
    assert s.forwarded_allow_ips == "10.0.0.1,10.1.0.0/16,::1,*"
    assert s.jwks_url == "file:///etc/falhook/jwks.json"
    assert Settings.from_env({"FALHOOK_JWKS_URL": "./jwks.json"}).jwks_url == "./jwks.json"


def test_defaults_are_shown_as_an_operator_writes_them() -> None:
    shown = {env: default for env, default, _ in Settings.env_table()}
    assert shown["FALHOOK_RETENTION"] == "7d"
    assert shown["FALHOOK_TOLERANCE_SECONDS"] == "300"
    assert shown["FALHOOK_LEASE_SECONDS"] == "60"
    assert shown["FALHOOK_LOG_PAYLOADS"] == "false"
    assert shown["FALHOOK_USER_ID"] == "unset"
    assert shown["FALHOOK_CALLBACK"] == "unset"
    assert shown["FALHOOK_LOG_LEVEL"] == "INFO"
    assert shown["FALHOOK_DATABASE_URL"] == "sqlite:///./falhook.db"


def test_parse_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match="--lease-seconds"):
        Settings.parse_value("lease_seconds", "abc")
    assert Settings.parse_value("lease_seconds", "0.25") == 0.25


def test_settings_are_frozen_and_replace_returns_a_copy() -> None:
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lease_seconds = 1.0  # type: ignore[misc]
    t = s.replace(lease_seconds=1.0)
    assert t.lease_seconds == 1.0 and s.lease_seconds == 60.0


def test_env_table_documents_every_setting() -> None:
    names = [name for name, _, _ in Settings.env_table()]
    assert len(names) == len(dataclasses.fields(Settings))
    for documented in (
        "FALHOOK_DATABASE_URL",
        "FALHOOK_JWKS_URL",
        "FALHOOK_USER_ID",
        "FALHOOK_TOLERANCE_SECONDS",
        "FALHOOK_MAX_BODY_BYTES",
        "FALHOOK_CALLBACK",
        "FALHOOK_CALLBACK_MAX_ATTEMPTS",
        "FALHOOK_CALLBACK_BACKOFF_SECONDS",
        "FALHOOK_LEASE_SECONDS",
    ):
        assert documented in names


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FALHOOK_DATABASE_URL", "postgresql://falhook:s3cret@db.internal:5432/falhook"),
        ("FALHOOK_DATABASE_URL", "mysql://falhook:s3cret@db.internal/falhook"),
        ("FALHOOK_FORWARD_TO", "ftp://falhook:s3cret@files.internal/in"),
    ],
)
def test_a_password_in_a_refused_url_is_not_repeated(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({var: value})
    assert "s3cret" not in str(info.value)
    assert "***@" in str(info.value)  # a forward URL's whole user info is masked
    with pytest.raises(SettingsError) as flag:
        Settings.parse_value(var.removeprefix("FALHOOK_").lower(), value)
    assert "s3cret" not in str(flag.value)


@pytest.mark.parametrize("key", ["k\u00e9y", "key with spaces", "key\nX-Evil: 1"])
def test_a_fal_key_that_cannot_be_sent_is_refused_without_showing_it(key: str) -> None:
    with pytest.raises(SettingsError, match="FALHOOK_FAL_KEY") as info:
        Settings.from_env({"FALHOOK_FAL_KEY": key})
    assert key not in str(info.value)
    assert Settings.from_env({"FALHOOK_FAL_KEY": " abc:123-XYZ_z "}).fal_key == "abc:123-XYZ_z"


@pytest.mark.parametrize(
    ("field", "value", "typed"),
    [
        ("lease_seconds", -5.0, "-5"),
        ("lease_seconds", float("inf"), "inf"),
        ("concurrency", 0, "0"),
        ("callback_max_attempts", 2.5, "2.5"),
        ("tolerance_seconds", -1.0, "-1"),
        ("log_level", "loud", "loud"),
        ("forwarded_allow_ips", "proxy.internal", "proxy.internal"),
        ("public_url", "https://hooks.example.com?x=1", "https://hooks.example.com?x=1"),
        ("jwks_url", "ftp://example.com/jwks.json", "ftp://example.com/jwks.json"),
    ],
)
def test_a_settings_built_in_code_is_checked_as_the_cli_checks_it(
    field: str, value: Any, typed: str
) -> None:
    # An idle receiver with lease_seconds=-5 would spin a core: refused however it is built.
    env = "FALHOOK_" + field.upper()
    with pytest.raises(SettingsError) as from_cli:
        Settings.from_env({env: typed})
    wanted = str(from_cli.value).removeprefix(f"{env}={typed!r}: ")
    for build in (
        lambda: Settings(**{field: value}),
        lambda: Settings.from_env({}, **{field: value}),
        lambda: Settings().replace(**{field: value}),
    ):
        with pytest.raises(SettingsError) as in_code:
            build()
        assert str(in_code.value) == f"{field}={value!r}: {wanted}"
        assert "\n" not in str(in_code.value)


def test_a_settings_built_in_code_is_read_as_from_env() -> None:
    s = Settings(
        lease_seconds=5,
        retention=0,
        callbacks=["a:b"],  # type: ignore[arg-type]
        user_id="  ",
        log_level="debug",
    )
    assert s == Settings.from_env(
        {
            "FALHOOK_LEASE_SECONDS": "5",
            "FALHOOK_RETENTION": "0",
            "FALHOOK_CALLBACK": "a:b",
            "FALHOOK_LOG_LEVEL": "debug",
        }
    )
    assert type(s.lease_seconds) is float and s.callbacks == ("a:b",) and s.user_id is None
    assert Settings(retention=36 * 3600.0).retention == 36 * 3600.0
    assert Settings(retention="36h", concurrency="8").retention == 36 * 3600.0  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"retention=\[1\]: .* is not a duration"):
        Settings(retention=[1])  # type: ignore[arg-type]
    assert Settings() == Settings.from_env({})  # every default passes its own check


def test_a_secret_given_in_code_is_not_shown_when_refused() -> None:
    with pytest.raises(SettingsError) as info:
        Settings(fal_key="key with spaces")
    assert "key with spaces" not in str(info.value)
    assert str(info.value).startswith("fal_key=…: wants")
