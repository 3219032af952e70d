"""Deployment files: docker/Dockerfile, .dockerignore and compose.yaml.

No Docker engine runs where these tests run, so they test everything around the image:

- compose.yaml against the Compose Specification schema (vendored in tests/data, see its
  README), as written and after interpolation; interpolation follows Compose's own rules, so a
  missing JWT_SECRET stops it with the guard's message;
- every path the files name exists and is in the build context (.dockerignore applied as Docker
  does); every command is a real `chat-service` command, parsed by its own argument parser; every
  variable given to the service is a real setting with a valid value;
- the Dockerfile's builder stage replayed outside Docker, step by step, with the local uv: its
  COPY lines copy the same files into a scratch /app, its `uv sync` lines run as written. The
  result stands in for the image's venv: it must work with the source tree gone;
- the very commands of the `migrate` and `app` services, run with that venv and the environment
  the container would have (the image's ENV, then the service's `environment`), with the host
  names `postgres` and `redis` pointed at a fresh database on the local Postgres and a throwaway
  `redis-server` started with the `redis` service's own command. The app is then used as a
  client would (sign up, chat over WebSockets) and stopped with SIGTERM like `docker compose
  stop` does.

Those last tests use Postgres whatever `--db` says, because compose.yaml runs Postgres; they
fail loudly when a tool or server they need is missing (CI installs and starts them all).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import jsonschema
import pytest
import sqlalchemy as sa
import websockets
import yaml
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from chat_service import cli
from chat_service.settings import Settings
from tests.conftest import ephemeral_postgres
from tests.helpers import API, PASSWORD, TEST_JWT_SECRET, bearer, free_port

pytestmark = pytest.mark.backend_independent(suite="sqlite")  # see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DATA = Path(__file__).parent / "data"
SCHEMA = DATA / "compose-spec.json"

CHAT_SERVICES = ("migrate", "app")
APP_DIR = "/app"  # the image's WORKDIR, where the venv lives
WAIT_S = 10.0

Json = dict[str, Any]


# --- reading the files ----------------------------------------------------------------------


def load_compose() -> Json:
    document: Json = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD (or of HEALTHCHECK's CMD)."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^(--\S+\s+)*CMD\s+", "", text)
        assert text.startswith("["), f"line {self.line}: {self.keyword} is not in exec form"
        argv = json.loads(text)
        assert isinstance(argv, list)
        assert all(isinstance(arg, str) for arg in argv)
        return argv


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"stage {self.name}: {len(found)} {keyword} instructions"
        return found[0]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages: continuation lines joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (and parser directives) are dropped, inside continuations too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append((start, pending + line))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            base = expand(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {number}: {keyword} before FROM"
            arg_name, _, default = instruction.args.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    return global_args, stages


def expand(text: str, values: Mapping[str, str]) -> str:
    """Dockerfile variable references (`$NAME`, `${NAME}`) from ARG and ENV values."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"{name} is not defined where it is used: {text}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def env_pairs(instruction: Instruction, values: Mapping[str, str]) -> dict[str, str]:
    """ENV KEY=VALUE ... (the key=value form only), references expanded."""
    pairs = {}
    for token in shlex.split(instruction.args):
        key, sep, value = token.partition("=")
        assert sep, f"line {instruction.line}: use ENV KEY=VALUE, not the legacy form"
        pairs[key] = expand(value, {**values, **pairs})
    return pairs


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """COPY's flags (--from=..., --chown=...), sources and destination."""
    words = shlex.split(instruction.args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"line {instruction.line}: COPY needs a source and a destination"
    return flags, words[:-1], words[-1]


def run_words(instruction: Instruction) -> list[str]:
    """A shell-form RUN as words, its --mount/--network flags left out; one simple command."""
    words = shlex.split(instruction.args)
    while words and words[0].startswith("--"):
        words.pop(0)
    return words


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage() -> Stage:
    return dockerfile()[1][-1]


# --- .dockerignore, as Docker applies it ----------------------------------------------------

Rules = list[tuple[bool, re.Pattern[str]]]  # (exception?, pattern), in file order


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go filepath.Match syntax plus `**`, as in Docker's pattern matcher."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> Rules:
    """(exception?, pattern) in file order; paths are cleaned and taken from the context root."""
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
        rules.append((exception, _glob_regex(pattern)))
    return rules


def ignored(path: str, rules: Rules) -> bool:
    """Is `path` (relative to the context) left out? The last rule that matches it, or one of
    its parent folders, decides (Docker's MatchesOrParentMatches)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not exception
    return result


def context_files(source: Path, rules: Rules) -> list[Path]:
    """The files under `source` (a file or a folder in the context) that Docker would send."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return [f for f in files if not ignored(f.relative_to(ROOT).as_posix(), rules)]


# --- Compose interpolation ------------------------------------------------------------------


class InterpolationError(ValueError):
    pass


_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation (compose-go's template package): `$$` is a literal `$`;
    `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?message}`,
    `${NAME?message}`, `${NAME:+alt}`, `${NAME+alt}`, with defaults and messages interpolated
    in turn; any other `$` is an invalid template, an error."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif name := _NAME.match(text, i + 1):
            out.append(env.get(name.group(), ""))
            i = name.end()
        elif text.startswith("${", i):
            end = _closing_brace(text, i)
            out.append(_braced(text[i + 2 : end], env, text))
            i = end + 1
        else:
            raise InterpolationError(f"invalid template: {text!r}")
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"invalid template: {text!r}")


def _braced(body: str, env: Mapping[str, str], text: str) -> str:
    name = _NAME.match(body)
    if name is None:
        raise InterpolationError(f"invalid template: {text!r}")
    rest, value = body[name.end() :], env.get(name.group())
    if not rest:
        return value or ""
    for operator in (":?", "?", ":-", "-", ":+", "+"):
        if rest.startswith(operator):
            argument = interpolate(rest[len(operator) :], env)
            if (operator == ":?" and not value) or (operator == "?" and value is None):
                raise InterpolationError(
                    f"required variable {name.group()} is missing a value: {argument}"
                )
            if operator in (":?", "?"):
                return value or ""
            if operator == ":-":
                return value or argument
            if operator == "-":
                return argument if value is None else value
            if operator == ":+":
                return argument if value else ""
            return argument if value is not None else ""
    raise InterpolationError(f"invalid template: {text!r}")


def interpolated(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of the document interpolated (keys are not, as in Compose)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    return node


def variables(node: Any) -> set[str]:
    """The environment variables the document reads."""
    if isinstance(node, str):
        text = node.replace("$$", "")
        return set(re.findall(r"\$\{?([_a-zA-Z][_a-zA-Z0-9]*)", text))
    if isinstance(node, dict):
        return set().union(*(variables(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(variables(v) for v in node))
    return set()


COMPOSE_ENV = {"JWT_SECRET": TEST_JWT_SECRET}  # what `docker compose up` is given in the tests


def service(name: str, env: Mapping[str, str] = COMPOSE_ENV) -> Json:
    services: Json = interpolated(load_compose(), env)["services"]
    return dict(services[name])


def service_environment(name: str, env: Mapping[str, str] = COMPOSE_ENV) -> dict[str, str]:
    environment = service(name, env).get("environment", {})
    assert isinstance(environment, dict), f"{name}: write `environment` as a mapping"
    for key, value in environment.items():
        assert isinstance(value, str), f"{name}: quote {key}'s value ({value!r}): YAML 1.1 vs 1.2"
    return dict(environment)


def duration_s(text: str) -> float:
    """A Compose duration (`1m30s`, `15s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- chat-service's own command line ---------------------------------------------------------


class _Parsed(Exception):
    """Not an error: how the parse result gets out of cli.main before a handler runs."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.parser = parser
        self.namespace = namespace


def parse_command(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by chat-service's own parser (cli.main), stopped before any handler runs.
    Flags must be spelled out in full: argparse would take `--worker` for `--workers`, but a
    file that relies on that breaks when another flag starting the same way is added."""
    assert argv[0] == "chat-service", f"not a chat-service command: {argv}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("chat-service") == "chat_service.cli:main"
    original = argparse.ArgumentParser.parse_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self, original(self, *args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            cli.main(argv[1:])
        except _Parsed as parsed:
            subcommands = next(
                action.choices
                for action in parsed.parser._actions
                if isinstance(action, argparse._SubParsersAction)
            )
            known = subcommands[argv[1]]._option_string_actions
            for word in argv[2:]:
                flag = word.split("=", 1)[0]
                assert not flag.startswith("-") or flag in known, f"{argv}: no flag {flag}"
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"chat-service refuses {argv} (exit {exc.code}); see stderr above")
    pytest.fail(f"chat-service {argv} did not parse its arguments")


def with_port(argv: list[str], port: int) -> list[str]:
    index = argv.index("--port")
    return [*argv[: index + 1], str(port), *argv[index + 2 :]]


def healthcheck_url(argv: list[str]) -> str:
    """The URL a `python -c "...urlopen('URL'...)"` health check asks for."""
    assert argv[:2] == ["python", "-c"], f"not a python -c check: {argv}"
    found = re.findall(r"urlopen\('([^']+)'", argv[2])
    assert len(found) == 1, argv
    return str(found[0])


# --- the Dockerfile -------------------------------------------------------------------------


def test_dockerfile_stages_and_runtime_settings() -> None:
    global_args, stages = dockerfile()
    assert [s.name for s in stages] == ["builder", "runtime"]
    builder, runtime = stages
    assert builder.base == runtime.base, "the venv links to the interpreter of the builder's image"
    image = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", runtime.base)
    assert image, runtime.base
    assert (int(image[1]), int(image[2])) >= (3, 11), "requires-python is >=3.11"
    assert "PYTHON_IMAGE" in global_args

    syncs = [run_words(r) for r in builder.all("RUN") if run_words(r)[:2] == ["uv", "sync"]]
    assert syncs, "the builder installs the locked environment with uv sync"
    for words in syncs:
        assert {"--locked", "--no-dev", "--no-editable"} <= set(words), words
    assert "--no-install-project" not in syncs[-1], "the last sync installs the project"
    for instruction in runtime.all("RUN"):
        assert "uv" not in run_words(instruction), "no uv in the runtime stage"

    env: dict[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for instruction in runtime.all("ENV"):
        env.update(env_pairs(instruction, env))
    assert env["ENVIRONMENT"] == "production"
    assert env["PATH"].split(":")[0] == f"{APP_DIR}/.venv/bin"
    for name in env:
        if name != "PATH" and not name.startswith("PYTHON"):
            assert name.lower() in Settings.model_fields, f"ENV {name} is not a setting"

    user = runtime.one("USER").args
    assert user.split(":")[0] not in ("root", "0"), f"runs as root: USER {user}"
    assert any(f"--uid {user.split(':')[0]}" in r.args for r in runtime.all("RUN"))

    exposed = runtime.one("EXPOSE").args
    cmd = runtime.one("CMD").exec_form()
    serve = parse_command(cmd)
    assert serve.command == "serve"
    assert ipaddress.ip_address(serve.host).is_unspecified, "listen on every interface"
    assert str(serve.port) == exposed

    check = runtime.one("HEALTHCHECK").exec_form()
    url = urlsplit(healthcheck_url(check))
    assert "urllib.request" in check[2]
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", serve.port, "/healthz")
    assert re.search(r"--timeout=(\d+)s", runtime.one("HEALTHCHECK").args)


def test_every_copy_source_is_in_the_build_context() -> None:
    rules = dockerignore_rules()
    _, stages = dockerfile()
    names = [s.name for s in stages]
    copies = 0
    for position, stage in enumerate(stages):
        for instruction in stage.all("COPY") + stage.all("ADD"):
            assert instruction.keyword == "COPY", f"line {instruction.line}: use COPY"
            flags, sources, _ = copy_parts(instruction)
            if "from" in flags:
                assert flags["from"] in names[:position], f"line {instruction.line}: {flags}"
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"line {instruction.line}: {source} does not exist"
                assert not ignored(source, rules), f"{source} is left out by .dockerignore"
                assert context_files(path, rules), f"nothing of {source} reaches the builder"
                copies += 1
    assert copies >= 5


def test_dockerignore_keeps_local_state_out() -> None:
    rules = dockerignore_rules()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "data/chat.db",
        "data/jwt-secret",
        "test-output/report.txt",
        ".env",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        "src/chat_service/__pycache__/app.cpython-311.pyc",
        "alembic/versions/__pycache__/x.cpython-311.pyc",
        "tests/test_deploy.py",
        "node_modules/x/index.js",
    ):
        assert ignored(path, rules), f"{path} would be sent to the builder"
    for path in ("pyproject.toml", "uv.lock", "README.md", "src/chat_service/app.py"):
        assert not ignored(path, rules), f"{path} is left out of the build context"


# --- compose.yaml ---------------------------------------------------------------------------


def test_schema_file_is_the_vendored_one() -> None:
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest == (DATA / "compose-spec.json.sha256").read_text().split()[0]
    assert "Apache License" in (DATA / "compose-spec.LICENSE").read_text()


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    raw = load_compose()
    for document in (raw, interpolated(raw, COMPOSE_ENV)):
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
    # ... and the schema does catch mistakes, so passing means something.
    broken = {**raw, "services": {"app": {**raw["services"]["app"], "restart": False}}}
    assert list(validator.iter_errors(broken))


def test_compose_services_and_their_order() -> None:
    compose = interpolated(load_compose(), COMPOSE_ENV)
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "app"}
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    volume = services["postgres"]["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "the database lives on a named volume"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    assert services["app"]["depends_on"] == {
        "migrate": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    for name in ("postgres", "redis"):  # others wait for them to be service_healthy
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"


def test_compose_builds_from_the_dockerfile_and_runs_real_commands() -> None:
    final = final_stage()
    image_port = int(final.one("EXPOSE").args)
    for name in CHAT_SERVICES:
        definition = service(name)
        build = definition["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the context is the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert "image" not in definition, f"{name}: built here, never pulled"
        parsed = parse_command(definition["command"])
        assert parsed.command == {"migrate": "migrate", "app": "serve"}[name]

    app = service("app")
    serve = parse_command(app["command"])
    assert ipaddress.ip_address(serve.host).is_unspecified, "listen on every interface"
    assert serve.port == image_port
    assert serve.workers == 2
    assert app["ports"] == [f"{image_port}:{serve.port}"]
    url = urlsplit(healthcheck_url(app["healthcheck"]["test"][1:]))
    assert app["healthcheck"]["test"][0] == "CMD"
    assert (url.hostname, url.port, url.path) == ("127.0.0.1", serve.port, "/readyz")


def test_chat_services_use_real_settings_with_valid_values() -> None:
    compose = interpolated(load_compose(), COMPOSE_ENV)
    postgres = compose["services"]["postgres"]["environment"]
    for name in CHAT_SERVICES:
        environment = service_environment(name)
        unknown = [key for key in environment if key.lower() not in Settings.model_fields]
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            environment="production",
            **{key.lower(): value for key, value in environment.items()},
        )
        database = sa.make_url(environment["DATABASE_URL"])
        assert database.host in compose["services"], f"{name}: {database.host} is no service"
        assert (database.username, database.password, database.database, database.port) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
            postgres["POSTGRES_DB"],
            5432,
        ), f"{name}: DATABASE_URL does not match the postgres service"
        assert settings.jwt_secret == TEST_JWT_SECRET
        if name == "app":
            broker = urlsplit(settings.broker_url)
            assert broker.scheme == "redis"
            assert broker.hostname in compose["services"]
            assert broker.port == 6379
            assert not settings.auto_migrate, "the migrate service migrates, once"


def test_stop_grace_period_outlasts_the_graceful_shutdown() -> None:
    app = service("app")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{key.lower(): value for key, value in service_environment("app").items()},
    )
    grace = duration_s(app["stop_grace_period"])
    shutdown = settings.shutdown_grace_s + settings.shutdown_drain_delay_s
    assert shutdown + 2 <= grace, f"SIGKILL after {grace} s, shutdown may take {shutdown} s"


def test_jwt_secret_is_required_with_a_clear_message() -> None:
    raw = load_compose()
    assert variables(raw) == {"JWT_SECRET"}, "JWT_SECRET is the only thing read from outside"
    for missing in ({}, {"JWT_SECRET": ""}):
        with pytest.raises(InterpolationError) as failure:
            interpolated(raw, missing)
        message = str(failure.value)
        assert "required variable JWT_SECRET is missing a value" in message
        assert "32+ bytes" in message
        assert "JWT_SECRET=$(openssl rand -hex 32)" in message
    for name in CHAT_SERVICES:
        assert service_environment(name)["JWT_SECRET"] == TEST_JWT_SECRET


def test_interpolation_follows_compose() -> None:
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("$A ${A} $$A ${B:-b} ${EMPTY:-e} ${EMPTY-e} ${A:+x} ${B+x}", env) == (
        "a a $A b e  x "
    )
    assert interpolate("${B:-${A}}", env) == "a"
    with pytest.raises(InterpolationError, match="required variable B"):
        interpolate("${B:?say $$(this)}", env)
    for invalid in ("$(cmd)", "${A:?run $(cmd)}", "${}", "${A"):
        with pytest.raises(InterpolationError):
            interpolate(invalid, env)


# --- the image's venv, built outside Docker --------------------------------------------------


@dataclass
class Image:
    """The image as far as it can be made here: /app stands for `root`/app."""

    root: Path
    env: dict[str, str]  # the runtime stage's ENV, paths mapped, over this machine's environment
    workdir: Path
    cmd: list[str]
    healthcheck: list[str]

    def local(self, path: str) -> Path:
        assert path.startswith("/"), path
        return self.root / path.lstrip("/")


def _map_paths(value: str, root: Path) -> str:
    """Paths under /app in a value (one path, or a PATH-like list) moved under `root`."""
    return ":".join(
        str(root / part.lstrip("/")) if part == APP_DIR or part.startswith(APP_DIR + "/") else part
        for part in value.split(":")
    )


def _copy(sources: list[str], destination: Path, into_folder: bool, rules: Rules) -> None:
    """Docker's COPY from the context: a folder's contents, a file by name into a folder."""
    for source in sources:
        path = ROOT / source
        for file in context_files(path, rules):
            if path.is_dir():
                target = destination / file.relative_to(path)
            else:
                target = destination / file.name if into_folder else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


def _machine_env() -> dict[str, str]:
    """This machine's environment without anything that would configure chat-service or point
    at another venv: the container starts with none of it."""
    return {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in Settings.model_fields and key not in ("VIRTUAL_ENV", "PYTHONPATH")
    }


def build_image(root: Path) -> Image:
    """Replay the builder stage (COPY from the context, `uv sync` as written, with the local uv
    and this interpreter standing in for the image's), then leave in /app only what the runtime
    stage copies."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not installed: cannot replay the Dockerfile's builder stage")
    global_args, stages = dockerfile()
    builder, runtime = stages
    rules = dockerignore_rules()
    values = dict(global_args)
    env = _machine_env()
    workdir = root
    for instruction in builder.instructions:
        keyword = instruction.keyword
        if keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            values[name] = default
        elif keyword == "ENV":
            for key, value in env_pairs(instruction, {**env, **values}).items():
                env[key] = _map_paths(value, root)
        elif keyword == "WORKDIR":
            workdir = root / instruction.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            flags, sources, destination = copy_parts(instruction)
            assert not flags, f"line {instruction.line}: {flags}"
            if destination.startswith("/"):
                target = root / destination.lstrip("/")
            else:
                target = workdir / destination
            into_folder = destination.endswith("/") or len(sources) > 1
            _copy(sources, target, into_folder, rules)
        elif keyword == "RUN":
            words = [expand(word, values) for word in run_words(instruction)]
            assert not {"&&", "||", ";", "|"} & set(words), f"line {instruction.line}: one command"
            if words[:2] == ["pip", "install"]:
                packages = [w for w in words[2:] if not w.startswith("-")]
                assert [p.split("==")[0] for p in packages] == ["uv"], words
                continue  # the local uv stands in for it
            assert words[0] == "uv", f"line {instruction.line}: cannot replay {words}"
            replay_env = {
                **env,
                "UV_PYTHON": sys.executable,  # the image's python3.11 is this one here
                "UV_COMPILE_BYTECODE": "0",  # compiled once below, not at each sync
            }
            result = subprocess.run(
                [uv, *words[1:]],
                cwd=workdir,
                env=replay_env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert result.returncode == 0, f"{' '.join(words)} failed:\n{result.stderr}"
        else:
            pytest.fail(f"line {instruction.line}: no replay for {keyword} in the builder")

    if env.get("UV_COMPILE_BYTECODE") == "1":
        # As uv does at the end of each sync; without it, every process here (each worker too)
        # would compile every module it imports, since the image sets PYTHONDONTWRITEBYTECODE.
        venv = Path(env["UV_PROJECT_ENVIRONMENT"])
        subprocess.run(
            [venv / "bin" / "python", "-m", "compileall", "-q", "-j0", venv / "lib"],
            capture_output=True,
            timeout=300,
        )

    # The runtime stage: /app holds what it copies from the builder and the folders it makes.
    kept = set()
    for instruction in runtime.all("COPY"):
        flags, sources, destination = copy_parts(instruction)
        assert flags.get("from") == "builder", instruction
        assert sources == [destination], instruction
        kept.add(root / destination.lstrip("/"))
    app = root / APP_DIR.lstrip("/")
    for entry in app.iterdir():
        if entry in kept:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for made in re.findall(r"mkdir -p (\S+)", " ".join(r.args for r in runtime.all("RUN"))):
        (root / made.lstrip("/")).mkdir(parents=True, exist_ok=True)

    runtime_env = _machine_env()
    for instruction in runtime.all("ENV"):
        for key, value in env_pairs(instruction, runtime_env).items():
            runtime_env[key] = _map_paths(value, root)
    return Image(
        root=root,
        env=runtime_env,
        workdir=root / runtime.one("WORKDIR").args.lstrip("/"),
        cmd=runtime.one("CMD").exec_form(),
        healthcheck=runtime.one("HEALTHCHECK").exec_form(),
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build_image(tmp_path_factory.mktemp("image"))


def test_image_venv_works_without_the_source_tree(image: Image) -> None:
    venv = image.local(f"{APP_DIR}/.venv")
    assert sorted(p.name for p in image.local(APP_DIR).iterdir()) == [".venv", "data"]
    chat_service = shutil.which("chat-service", path=image.env["PATH"])
    assert chat_service == str(venv / "bin" / "chat-service"), "PATH finds the venv's command"
    python = venv / "bin" / "python"
    probe = (
        "import importlib.util as u, chat_service, json; print(json.dumps("
        "[chat_service.__file__, [m for m in ('pytest', 'ruff', 'mypy') if u.find_spec(m)]]))"
    )
    result = subprocess.run(
        [python, "-c", probe],
        cwd=image.workdir,
        env=image.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    package_file, dev_tools = json.loads(result.stdout)
    package = Path(package_file).parent
    assert package.is_relative_to(venv), f"chat_service imported from {package}"
    assert not dev_tools, f"dev tools in the image: {dev_tools}"

    # Everything the service ships (code, the web page, migrations) is inside the package.
    source = ROOT / "src" / "chat_service"
    shipped = {
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    shipped |= {
        f"_alembic/{p.relative_to(ROOT / 'alembic').as_posix()}"
        for p in (ROOT / "alembic").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    installed = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
    assert shipped <= installed, f"missing from the image: {sorted(shipped - installed)}"

    # Every command the files name exists in the installed command, flags included.
    commands = [image.cmd] + [service(name)["command"] for name in CHAT_SERVICES]
    for argv in commands:
        help_text = subprocess.run(
            [chat_service, argv[1], "--help"],
            cwd=image.workdir,
            env=image.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert help_text.returncode == 0, help_text.stderr
        for flag in (word for word in argv[2:] if word.startswith("--")):
            listed = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text.stdout)
            assert listed, f"{argv[1]} --help does not list {flag}"


# --- the services' commands, outside Docker ---------------------------------------------------


@pytest.fixture
async def compose_database() -> AsyncIterator[str]:
    """A fresh, empty database on the local Postgres: compose.yaml runs Postgres, so these tests
    do too, whatever --db says."""
    async with ephemeral_postgres("compose") as url:
        yield url


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int


@pytest.fixture
def compose_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """The redis service's own command, on a free local port: a Redis this test alone uses (its
    rate-limit counters start at zero, as in a new deployment)."""
    command = service("redis")["command"]
    binary = shutil.which(command[0])
    if binary is None:
        pytest.fail(f"{command[0]} is not installed")
    port = free_port()
    local_only = ("--dir", str(tmp_path), "--daemonize", "no")
    log = (tmp_path / "redis.log").open("ab")
    process = subprocess.Popen(
        [binary, *command[1:], *("--port", str(port), "--bind", "127.0.0.1"), *local_only],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert process.poll() is None, (tmp_path / "redis.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield RedisServer(process, port)
    finally:
        process.kill()
        process.wait(10)


def container_env(
    image: Image, name: str, database_url: str | None, redis_port: int | None, **compose_env: str
) -> dict[str, str]:
    """The environment the service's container gets: the image's ENV, then the service's
    `environment` (interpolated with `compose_env`), the hosts `postgres` and `redis` pointed at
    the local servers. Nothing else: no variable of this machine configures chat-service."""
    environment = service_environment(name, compose_env)
    if database_url is not None:
        local = sa.make_url(database_url)
        compose_url = sa.make_url(environment["DATABASE_URL"])
        assert compose_url.host == "postgres"
        environment["DATABASE_URL"] = compose_url.set(
            host=local.host,
            port=local.port,
            username=local.username,
            password=local.password,
            database=local.database,
        ).render_as_string(hide_password=False)
    if "BROKER_URL" in environment and redis_port is not None:
        parts = urlsplit(environment["BROKER_URL"])
        assert parts.hostname == "redis"
        environment["BROKER_URL"] = parts._replace(netloc=f"127.0.0.1:{redis_port}").geturl()
    return {**image.env, **environment}


@dataclass
class Process:
    """A service's command running here, its output in a file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, as `docker compose stop` sends; the exit code (None if it had to be
        killed) and how long it took."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        return code, time.monotonic() - started


def start(image: Image, argv: list[str], env: dict[str, str], log_path: Path) -> Process:
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable is not None, f"{argv[0]} is not on the image's PATH"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [executable, *argv[1:]], cwd=image.workdir, env=env, stdout=log, stderr=log
        )
    return Process(process, log_path)


async def run_to_end(
    image: Image, argv: list[str], env: dict[str, str], log_path: Path, within: float
) -> int:
    """Run a one-shot command; its exit code, or a failure if it is still running `within` s."""
    process = start(image, argv, env, log_path)
    try:
        return await asyncio.to_thread(process.process.wait, within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv} still running after {within} s:\n{process.logs()}")
    finally:
        process.stop(5)


async def wait_until_ready(base_url: str, process: Process, in_a_row: int = 6) -> None:
    """/readyz 200 several times in a row: with two workers each request may reach either."""
    deadline, streak = time.monotonic() + 30, 0
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as http:
        while streak < in_a_row:
            assert process.process.poll() is None, f"exited:\n{process.logs()}"
            assert time.monotonic() < deadline, f"not ready:\n{process.logs()}"
            try:
                streak = streak + 1 if (await http.get("/readyz")).status_code == 200 else 0
            except httpx.TransportError:
                streak = 0
            if streak == 0:
                await asyncio.sleep(0.2)


async def run_check(argv: list[str], env: dict[str, str], port: int, image: Image) -> int:
    """A health check's command, its port pointed at the one the app listens on here."""
    argv = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in argv]
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable is not None
    result = await asyncio.to_thread(
        subprocess.run, [executable, *argv[1:]], cwd=image.workdir, env=env, timeout=30
    )
    return result.returncode


class Client:
    """A WebSocket client whose frames are read in the background."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Json] = []
        self.close_code: int | None = None
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.frames.append(json.loads(raw))
                self._arrived.set()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self._arrived.set()

    async def expect(self, check: Callable[[Json], bool], what: str) -> Json:
        deadline = time.monotonic() + WAIT_S
        while True:
            for frame in self.frames:
                if check(frame):
                    return frame
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {WAIT_S} s: {self.frames[-5:]}"
            assert self.close_code is None, f"no {what}, closed {self.close_code}"
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def request(self, frame: Json, reply: str) -> Json:
        ref = f"r{len(self.frames)}-{time.monotonic_ns()}"
        await self.ws.send(json.dumps({**frame, "ref": ref}))
        answer = await self.expect(lambda f: f.get("ref") == ref, f"reply to {frame['type']}")
        assert answer["type"] == reply, answer
        return answer

    async def closed(self) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), WAIT_S)
        return self.close_code

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def test_migrate_then_app_chat_and_stop_like_compose(
    image: Image, compose_database: str, compose_redis: RedisServer, tmp_path: Path
) -> None:
    # migrate: exits 0 and leaves the schema at head.
    migrate = service("migrate")
    env = container_env(image, "migrate", compose_database, compose_redis.port, **COMPOSE_ENV)
    code = await run_to_end(image, migrate["command"], env, tmp_path / "migrate.log", 120)
    assert code == 0, (tmp_path / "migrate.log").read_text()
    connection = await asyncpg.connect(compose_database.replace("+asyncpg", ""))
    try:
        tables = {r["tablename"] for r in await connection.fetch("SELECT tablename FROM pg_tables")}
        version = await connection.fetchval("SELECT version_num FROM alembic_version")
    finally:
        await connection.close()
    assert {"users", "rooms", "memberships", "messages", "alembic_version"} <= tables
    assert version

    # app: its command, on a free port instead of 8000, with two workers on the shared Redis.
    app = service("app")
    port = free_port()
    env = container_env(image, "app", compose_database, compose_redis.port, **COMPOSE_ENV)
    server = start(image, with_port(app["command"], port), env, tmp_path / "app.log")
    clients: list[Client] = []
    try:
        base_url = f"http://127.0.0.1:{port}"
        await wait_until_ready(base_url, server)
        assert await run_check(image.healthcheck, env, port, image) == 0, "image HEALTHCHECK"
        assert await run_check(app["healthcheck"]["test"][1:], env, port, image) == 0

        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            tokens = []
            for name in ("alice", "bob"):
                response = await http.post(
                    f"{API}/auth/signup", json={"username": name, "password": PASSWORD}
                )
                assert response.status_code == 201, response.text
                tokens.append(response.json()["access_token"])
            response = await http.post(
                f"{API}/rooms",
                json={"name": "compose", "visibility": "public"},
                headers=bearer(tokens[0]),
            )
            assert response.status_code == 201, response.text
            room = response.json()["id"]

        for token in tokens:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{port}/ws", additional_headers=bearer(token), open_timeout=10
            )
            clients.append(Client(ws))
            await clients[-1].expect(lambda f: f["type"] == "hello", "hello")
            await clients[-1].request({"type": "join", "room_id": room}, "joined")
        alice, bob = clients
        send = {"type": "message.send", "room_id": room, "body": "hi from compose"}
        ack = await alice.request({**send, "client_id": "c-1"}, "ack")
        new = await bob.expect(
            lambda f: f["type"] == "message.new" and f["message"]["seq"] == ack["message"]["seq"],
            "message.new",
        )
        assert new["message"]["body"] == "hi from compose"

        # SIGTERM, as `docker compose stop` sends: a clean exit, before Docker's SIGKILL.
        code, took = await asyncio.to_thread(server.stop, 30)
        grace = duration_s(app["stop_grace_period"])
        assert code == 0, f"exit {code} after SIGTERM ({took:.1f} s):\n{server.logs()}"
        assert took < grace, f"took {took:.1f} s: Docker would SIGKILL after {grace} s"
        assert [await client.closed() for client in clients] == [1012, 1012]
        assert await run_check(image.healthcheck, env, port, image) != 0, "check sees it down"
    finally:
        for client in clients:
            await client.close()
        server.stop(10)


@pytest.mark.parametrize("name", CHAT_SERVICES)
async def test_without_jwt_secret_the_image_refuses_to_start(
    image: Image, name: str, tmp_path: Path
) -> None:
    """The image run without JWT_SECRET (`docker run`, or compose with the guard removed)."""
    definition = service(name)
    env = container_env(image, name, None, None, **COMPOSE_ENV)
    del env["JWT_SECRET"]
    argv = definition["command"]
    if "--port" in argv:
        argv = with_port(argv, free_port())
    code = await run_to_end(image, argv, env, tmp_path / "out.log", 30)
    output = (tmp_path / "out.log").read_text()
    assert code != 0, output
    assert "JWT_SECRET is required" in output, output
    assert "Traceback" not in output, "an operator gets one line, not a traceback"


async def test_infrastructure_health_checks_run_here() -> None:
    """postgres' and redis' checks, as written, against this machine's servers (they run inside
    their containers, where 127.0.0.1 and the default ports are the servers too)."""
    checks = {name: service(name)["healthcheck"]["test"] for name in ("postgres", "redis")}
    if not shutil.which("pg_isready") or not shutil.which("redis-cli"):
        pytest.fail("pg_isready or redis-cli is not installed")
    for port in (5432, 6379):
        try:
            socket.create_connection(("127.0.0.1", port), 2).close()
        except OSError:
            pytest.fail(f"nothing listens on 127.0.0.1:{port}")

    def run(test: list[str]) -> int:
        kind, *argv = test
        if kind == "CMD-SHELL":
            return subprocess.run(["/bin/sh", "-c", argv[0]], timeout=30).returncode
        return subprocess.run(argv, timeout=30).returncode

    closed = free_port()
    postgres = checks["postgres"]
    assert await asyncio.to_thread(run, postgres) == 0
    down = [arg if arg != "5432" else str(closed) for arg in postgres]
    assert await asyncio.to_thread(run, down) != 0, "pg_isready must fail when nothing listens"
    redis = checks["redis"]
    assert await asyncio.to_thread(run, redis) == 0
    down = [*redis[:-1], redis[-1].replace("redis-cli", f"redis-cli -p {closed}")]
    assert await asyncio.to_thread(run, down) != 0, "the check must fail when nothing listens"
