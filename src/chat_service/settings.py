"""The one settings object: every knob the service has, read from the environment."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32
DEV_SECRET_FILE = "jwt-secret"


class Environment(StrEnum):
    dev = "dev"
    production = "production"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Read from environment variables (case-insensitive) and an optional `.env` file."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Environment = Environment.dev
    data_dir: Path = Path("data")

    database_url: str = ""
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(10, ge=0)
    db_command_timeout_s: float = Field(10.0, gt=0)
    db_connect_timeout_s: float = Field(5.0, gt=0)
    auto_migrate: bool = True

    jwt_secret: str = ""
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    jwt_issuer: str = "chat-service"
    jwt_audience: str = "chat-service"
    access_token_ttl_s: int = Field(900, ge=5)
    refresh_token_ttl_s: int = Field(30 * 24 * 3600, ge=60)
    ws_ticket_ttl_s: int = Field(30, ge=5, le=300)

    argon2_memory_kib: int = Field(19456, ge=19456)
    argon2_time_cost: int = Field(2, ge=2)
    argon2_parallelism: int = Field(1, ge=1)
    password_hash_concurrency: int = Field(2, ge=1)

    cors_origins: CsvList = Field(default_factory=list)
    ws_allowed_origins: CsvList = Field(default_factory=list)
    forwarded_allow_ips: str = "127.0.0.1"

    broker_url: str = "memory://"
    rate_limit_storage_url: str = ""

    message_max_chars: int = Field(4000, ge=1)
    frame_max_bytes: int = Field(64 * 1024, ge=1024)
    message_rate_per_s: int = Field(10, ge=1)
    message_burst: int = Field(20, ge=1)
    typing_rate_per_s: int = Field(1, ge=1)
    max_connections_per_user: int = Field(10, ge=1)
    presence_ttl_s: float = Field(30.0, ge=1)
    max_rooms_per_connection: int = Field(200, ge=1)
    outbound_queue_frames: int = Field(1000, ge=10)
    outbound_queue_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    heartbeat_interval_s: float = Field(20.0, gt=0)
    heartbeat_timeout_s: float = Field(20.0, gt=0)
    shutdown_grace_s: int = Field(10, ge=1)
    shutdown_drain_delay_s: float = Field(0.0, ge=0)

    login_account_limit: str = "5/15 minutes"
    login_ip_limit: str = "20/minute"
    signup_ip_limit: str = "10/hour"

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "console"
    metrics_enabled: bool = True

    _split_lists = field_validator("cors_origins", "ws_allowed_origins", mode="before")(_split_csv)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Accept the plain URLs operators write and pick the async driver for them."""
        for plain, driver in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        return value

    @model_validator(mode="after")
    def _check_secret(self) -> Settings:
        if self.jwt_secret and len(self.jwt_secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
        if not self.jwt_secret and self.environment is not Environment.dev:
            raise ValueError("JWT_SECRET is required when ENVIRONMENT is not 'dev'")
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'chat.db').resolve()}"

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        """Where limit counters live: with a shared broker, shared by default too."""
        return self.rate_limit_storage_url or self.broker_url

    @property
    def is_sqlite(self) -> bool:
        return self.resolved_database_url.startswith("sqlite")


# Said once per process, however many times settings are loaded.
_dev_secret_announced: list[Path] = []


def _dev_secret(data_dir: Path) -> str:
    """Generate the development secret once and keep it beside the embedded database."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / DEV_SECRET_FILE
    _write_once(path, secrets.token_urlsafe(48))
    if not _dev_secret_announced:
        _dev_secret_announced.append(path)
        log.warning(
            "JWT_SECRET is not set: using the development secret kept in %s. "
            "Set JWT_SECRET and ENVIRONMENT=production for any real deployment.",
            path,
        )
    secret = path.read_text().strip()
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the development secret in {path} is damaged (under {MIN_SECRET_BYTES} bytes): "
            "delete the file and a new one is made at the next start"
        )
    return secret


def _write_once(path: Path, content: str) -> None:
    """Create `path` with `content` atomically: readers see the whole file or none.

    Workers starting together race here; a hard link never replaces an existing file, so
    exactly one secret wins and nobody reads a half-written one.
    """
    if path.exists():
        return
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret-")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def load_settings(**overrides: object) -> Settings:
    """Build the settings, filling in the development secret when dev mode leaves it empty."""
    settings = Settings(**overrides)  # type: ignore[arg-type]
    if settings.jwt_secret:
        return settings
    # Validated again, so a damaged secret file is refused like a short JWT_SECRET.
    return Settings.model_validate(
        {**settings.model_dump(), "jwt_secret": _dev_secret(settings.data_dir)}
    )
