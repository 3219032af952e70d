"""Optional profiling of the server under test with py-spy (an external tool, not a dependency:
`--profile --py-spy "uvx py-spy"`), and a summary of where its CPU went."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shlex
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# "function (package/module.py:123)" in py-spy's raw (collapsed) output.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
PACKAGES = (
    "chat_service",
    "sqlalchemy",
    "sqlmodel",
    "asyncpg",
    "uvicorn",
    "websockets",
    "starlette",
    "fastapi",
    "pydantic",
    "pydantic_core",
    "limits",
    "jose",
    "passlib",
    "argon2",
    "orjson",
    "redis",
    "logging",
    "asyncio",
    "uvloop",
)


# Frames on (nearly) every stack: start-up and event-loop plumbing, left out of the table.
PLUMBING = re.compile(
    r"\((<frozen runpy>|threading\.py|asyncio/(runners|events|base_events)\.py|"
    r"chat_service/(cli|__main__)\.py|uvicorn/(main|server|_compat)\.py)\)$"
)


# What a stack is busy with, first match wins. SQLAlchemy's asyncio layer runs queries in
# greenlets whose stacks do not show the coroutine above them: any SQLAlchemy or asyncpg
# frame counts as database work.
ACTIVITIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("database (SQLAlchemy, asyncpg, domain queries)", r"\((sqlalchemy|sqlmodel|asyncpg)/"),
        ("passwords and tokens (argon2, JWT)", r"\((passlib|argon2|jose|cryptography)/"),
        ("rate limiter", r"\(limits/|chat_service/ratelimit\.py"),
        ("WebSocket send (writer task, ASGI send chain)", r"run_writer|Protocol\.send \("),
        ("WebSocket handshake and receive", r"data_received|Gateway\.(_receive|serve)|handshake"),
        ("hub and fan-out", r"chat_service/realtime/(hub|fanout)\.py"),
        ("logging and metrics", r"\((logging|prometheus_client)/|logging_config"),
        ("JSON and models (orjson, pydantic)", r"\((pydantic|pydantic_core|orjson|json)/"),
        ("event loop and tasks", r"\(asyncio/"),
    )
)


@dataclass(frozen=True)
class Profile:
    path: Path
    samples: int
    self_by_package: list[tuple[str, float]]  # share of samples, leaf frame's package
    inclusive: list[tuple[str, float]]  # share of samples with the function on the stack
    by_activity: list[tuple[str, float]]  # share of samples, by what the stack is doing


@contextlib.asynccontextmanager
async def record(py_spy: str, pid: int, path: Path, rate: int = 200) -> AsyncIterator[None]:
    """Sample `pid` (and its children) while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        *shlex.split(py_spy),
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        # Only stacks holding the GIL: Python's CPU, without idle threads (which py-spy cannot
        # always tell apart on this kind of VM); native work that releases the GIL (argon2,
        # socket I/O) is left out and shows in the CPU figures instead.
        "--gil",
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(path),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    await asyncio.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
        if process.returncode not in (0, -signal.SIGINT):
            log.warning("py-spy ended with %s; is it installed (--py-spy)?", process.returncode)


def _package(file: str) -> str:
    head = file.split("/", 1)[0].removesuffix(".py")
    return head if head in PACKAGES else ("stdlib/other" if "/" not in file else head)


def summarize(path: Path, top: int = 25) -> Profile | None:
    """Self time by package and inclusive time by function, from py-spy's raw output."""
    if not path.exists():
        return None
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    activity: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        activity[next((n for n, p in ACTIVITIES if p.search(stack)), "other")] += count
        names = []
        for frame in frames:
            match = FRAME.match(frame)
            if match is None:
                names.append(("?", frame))
                continue
            names.append((match["file"], f"{match['function']} ({match['file']})"))
        self_time[_package(names[-1][0])] += count
        for name in {name for _, name in names}:
            if not PLUMBING.search(name):
                inclusive[name] += count
    if not total:
        return None
    return Profile(
        path=path,
        samples=total,
        self_by_package=[(name, n / total) for name, n in self_time.most_common()],
        inclusive=[(name, n / total) for name, n in inclusive.most_common(top)],
        by_activity=[(name, n / total) for name, n in activity.most_common()],
    )


def markdown(profile: Profile, title: str) -> str:
    packages = ", ".join(f"{name} {share:.0%}" for name, share in profile.self_by_package[:10])
    activities = ", ".join(f"{name} {share:.0%}" for name, share in profile.by_activity)
    lines = [
        f"Profile of {title} ({profile.samples} samples with the GIL, `{profile.path.name}`).",
        "",
        f"By activity: {activities}.",
        "",
        f"By package (self time): {packages}.",
        "",
        "| function (inclusive) | share of CPU samples |",
        "|---|---|",
        *(f"| `{name}` | {share:.0%} |" for name, share in profile.inclusive),
        "",
    ]
    return "\n".join(lines)
