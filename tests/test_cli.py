"""The real `chat-service` entry point in a subprocess: refusals, migrate, openapi."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlmodel import SQLModel

import chat_service.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from chat_service.settings import Settings
from tests.helpers import TEST_JWT_SECRET, free_port

# Generous: a loaded CI machine takes seconds just to import the app. A refusal that started
# the server instead would never exit, and the timeout would fail the test.
TIMEOUT_S = 120


def clean_env(**extra: str) -> dict[str, str]:
    """The runner's environment without any chat-service setting, plus `extra`."""
    settings_vars = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in settings_vars}
    env.update(extra)
    return env


def run(
    args: list[str], cwd: Path, timeout: float = TIMEOUT_S, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chat_service", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert len(lines(result.stderr)) == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_serve_refuses_production_without_secret(tmp_path: Path) -> None:
    port = str(free_port())
    result = run(["serve", "--port", port], tmp_path, ENVIRONMENT="production")
    assert result.returncode != 0, result.stderr
    assert_one_clear_line(result, "JWT_SECRET", "invalid configuration")
    assert not (tmp_path / "data").exists(), "nothing may be created for a refused configuration"


def test_serve_refuses_short_secret(tmp_path: Path) -> None:
    port = str(free_port())
    result = run(["serve", "--port", port], tmp_path, JWT_SECRET="short-secret")
    assert result.returncode != 0, result.stderr
    assert_one_clear_line(result, "JWT_SECRET", "32 bytes")
    assert "short-secret" not in result.stdout + result.stderr


def test_serve_with_workers_needs_shared_broker(tmp_path: Path) -> None:
    port = str(free_port())
    result = run(
        ["serve", "--workers", "2", "--port", port],
        tmp_path,
        JWT_SECRET=TEST_JWT_SECRET,
        LOG_FORMAT="console",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert "BROKER_URL" in result.stderr, result.stderr
    assert "--workers 2" in result.stderr, result.stderr
    assert TEST_JWT_SECRET not in output


def test_migrate_creates_tables_on_fresh_sqlite(tmp_path: Path) -> None:
    database = tmp_path / "x.db"
    result = run(
        ["migrate"], tmp_path, DATABASE_URL=f"sqlite:///{database}", JWT_SECRET=TEST_JWT_SECRET
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert database.is_file()
    with sqlite3.connect(database) as connection:
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        version = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    expected = {table.name for table in SQLModel.metadata.sorted_tables}
    assert expected <= tables, f"missing tables: {expected - tables}"
    assert len(version) == 1, version

    # A second run at head succeeds and changes nothing.
    again = run(
        ["migrate"], tmp_path, DATABASE_URL=f"sqlite:///{database}", JWT_SECRET=TEST_JWT_SECRET
    )
    assert again.returncode == 0, again.stdout + again.stderr
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == version


def test_openapi_prints_the_document(tmp_path: Path) -> None:
    result = run(["openapi"], tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert {"openapi", "paths"} <= set(document)
    assert document["openapi"].startswith("3.")
    assert "/api/v1/auth/signup" in document["paths"]
    assert "post" in document["paths"]["/api/v1/auth/signup"]
    # Printing the document touches no data directory and generates no secret.
    assert not (tmp_path / "data").exists()


def test_openapi_output_file(tmp_path: Path) -> None:
    target = tmp_path / "openapi.json"
    result = run(["openapi", "--output", str(target)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "/api/v1/users/me" in json.loads(target.read_text())["paths"]


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run(["frobnicate"], tmp_path)
    assert result.returncode == 2
    assert "usage: chat-service" in result.stderr
    assert "Traceback" not in result.stderr


def test_migrate_against_an_unreachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://chat:hunter2-db-password@127.0.0.1:{port}/chat"
    result = run(
        ["migrate"], tmp_path, DATABASE_URL=url, JWT_SECRET=TEST_JWT_SECRET, LOG_LEVEL="WARNING"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert_one_clear_line(result, "cannot migrate the database", f"127.0.0.1:{port}")
    assert "hunter2-db-password" not in result.stdout + result.stderr


def test_migrate_creates_the_directory_of_a_sqlite_file(tmp_path: Path) -> None:
    """The default database lives in DATA_DIR, which a first run has not made yet."""
    result = run(["migrate"], tmp_path, JWT_SECRET=TEST_JWT_SECRET, LOG_LEVEL="WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "data" / "chat.db").is_file()
