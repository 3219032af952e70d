"""Settings: secret rules, the development secret, URL normalisation, list parsing, defaults."""

from __future__ import annotations

import logging
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from chat_service import settings as settings_module
from chat_service.settings import (
    DEV_SECRET_FILE,
    MIN_SECRET_BYTES,
    Environment,
    Settings,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting comes from the runner's environment or from a `.env` file."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    # The development-secret warning is said once per process; each test starts afresh.
    monkeypatch.setattr(settings_module, "_dev_secret_announced", [])


def test_short_secret_refused() -> None:
    with pytest.raises(ValidationError, match="JWT_SECRET must be at least 32 bytes"):
        Settings(jwt_secret="s" * (MIN_SECRET_BYTES - 1))
    assert Settings(jwt_secret="s" * MIN_SECRET_BYTES).jwt_secret == "s" * MIN_SECRET_BYTES


def test_secret_length_counts_bytes_not_characters() -> None:
    # 16 two-byte characters: 32 bytes.
    assert Settings(jwt_secret="é" * 16).jwt_secret == "é" * 16
    with pytest.raises(ValidationError):
        Settings(jwt_secret="é" * 15)


def test_short_secret_from_environment_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", "too-short")
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        Settings()


def test_production_requires_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="JWT_SECRET is required"):
        Settings()
    with pytest.raises(ValidationError, match="JWT_SECRET is required"):
        load_settings(data_dir=tmp_path / "data")
    # No development secret was written for a production configuration.
    assert not (tmp_path / "data" / DEV_SECRET_FILE).exists()
    monkeypatch.setenv("JWT_SECRET", "p" * 40)
    settings = Settings()
    assert settings.environment is Environment.production
    assert settings.jwt_secret == "p" * 40


def test_dev_secret_generated_once_and_reused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    caplog.set_level(logging.DEBUG)
    first = load_settings(data_dir=data_dir)
    secret_file = data_dir / DEV_SECRET_FILE
    assert secret_file.is_file()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(first.jwt_secret.encode()) >= MIN_SECRET_BYTES
    assert secret_file.read_text().strip() == first.jwt_secret
    assert first.environment is Environment.dev

    second = load_settings(data_dir=data_dir)
    assert second.jwt_secret == first.jwt_secret
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "no warning that the development secret is in use"
    assert any("JWT_SECRET" in r.getMessage() for r in warnings)
    assert first.jwt_secret not in caplog.text
    for record in caplog.records:
        assert first.jwt_secret not in record.getMessage()
        assert first.jwt_secret not in repr(record.args)


def test_dev_secret_differs_per_data_dir(tmp_path: Path) -> None:
    one = load_settings(data_dir=tmp_path / "one").jwt_secret
    two = load_settings(data_dir=tmp_path / "two").jwt_secret
    assert one != two


def test_explicit_secret_writes_no_file(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", jwt_secret="k" * 40)
    assert settings.jwt_secret == "k" * 40
    assert not (tmp_path / "data" / DEV_SECRET_FILE).exists()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/chat", "postgresql+asyncpg://u:p@db:5432/chat"),
        ("postgres://u@db/chat", "postgresql+asyncpg://u@db/chat"),
        ("postgresql+asyncpg://u@db/chat", "postgresql+asyncpg://u@db/chat"),
        ("sqlite:///x", "sqlite+aiosqlite:///x"),
        ("sqlite:////abs/path/chat.db", "sqlite+aiosqlite:////abs/path/chat.db"),
        ("sqlite+aiosqlite:///x", "sqlite+aiosqlite:///x"),
    ],
)
def test_database_url_gets_async_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", given)
    settings = Settings(jwt_secret="k" * 40)
    assert settings.database_url == expected
    assert settings.resolved_database_url == expected
    assert settings.is_sqlite is expected.startswith("sqlite")


def test_default_database_is_sqlite_file_in_data_dir(tmp_path: Path) -> None:
    settings = Settings(jwt_secret="k" * 40, data_dir=tmp_path / "data")
    assert settings.database_url == ""
    assert settings.resolved_database_url == (
        f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'chat.db').resolve()}"
    )
    assert settings.is_sqlite


def test_default_data_dir_is_relative_data(tmp_path: Path) -> None:
    settings = Settings(jwt_secret="k" * 40)
    assert settings.data_dir == Path("data")
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'chat.db'}"


@pytest.mark.parametrize("variable", ["CORS_ORIGINS", "WS_ALLOWED_ORIGINS"])
def test_origin_lists_from_comma_separated_env(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(
        variable, "https://a.example, https://b.example:8443 ,,http://localhost:3000"
    )
    settings = Settings(jwt_secret="k" * 40)
    assert getattr(settings, variable.lower()) == [
        "https://a.example",
        "https://b.example:8443",
        "http://localhost:3000",
    ]


def test_origin_lists_default_empty_and_single_value(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(jwt_secret="k" * 40)
    assert (settings.cors_origins, settings.ws_allowed_origins) == ([], [])
    monkeypatch.setenv("CORS_ORIGINS", "https://only.example")
    monkeypatch.setenv("WS_ALLOWED_ORIGINS", "")
    settings = Settings(jwt_secret="k" * 40)
    assert settings.cors_origins == ["https://only.example"]
    assert settings.ws_allowed_origins == []


def test_environment_variables_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("jwt_secret", "m" * 40)
    monkeypatch.setenv("Log_Level", "debug")
    settings = Settings()
    assert settings.jwt_secret == "m" * 40
    assert settings.log_level == "DEBUG"


def test_dotenv_in_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("JWT_SECRET=" + "d" * 40 + "\nCORS_ORIGINS=https://x.example\n")
    settings = Settings()
    assert settings.jwt_secret == "d" * 40
    assert settings.cors_origins == ["https://x.example"]


def test_settings_are_frozen() -> None:
    settings = Settings(jwt_secret="k" * 40)
    with pytest.raises(ValidationError):
        settings.jwt_secret = "z" * 40  # type: ignore[misc]


@pytest.mark.parametrize("content", ["", "short", "   \n"], ids=["empty", "short", "blank"])
def test_damaged_dev_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "jwt-secret").write_text(content)
    with pytest.raises(ValueError, match="is damaged"):
        load_settings(data_dir=tmp_path)


def test_racing_workers_agree_on_one_dev_secret(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        secrets = set(pool.map(lambda _: load_settings(data_dir=tmp_path).jwt_secret, range(32)))
    assert len(secrets) == 1
    assert len(secrets.pop()) >= 32
    assert [p.name for p in tmp_path.iterdir()] == ["jwt-secret"]  # no temporary files left
