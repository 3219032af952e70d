"""What /proc says about a process tree (CPU, RSS), CPU pinning, and the machine."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (uvicorn workers, multiprocessing helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    return total


@dataclass
class Usage:
    cpu: float  # cores busy on average (1.0 = one core)
    rss_mib: float  # at the end


class CpuMeter:
    """CPU use of a process tree between start() and stop(); RSS at the stop."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._cpu: dict[int, float] = {}
        self._wall = 0.0

    def start(self) -> None:
        if self.pid is None:
            return
        self._cpu = {p: cpu_seconds([p]) for p in process_tree(self.pid)}
        self._wall = time.monotonic()

    def stop(self) -> Usage | None:
        if self.pid is None or not self._cpu:
            return None
        pids = process_tree(self.pid)
        elapsed = max(time.monotonic() - self._wall, 1e-9)
        # Processes that started meanwhile count from zero; those that ended are not counted.
        busy = sum(cpu_seconds([p]) - self._cpu.get(p, 0.0) for p in pids)
        return Usage(cpu=busy / elapsed, rss_mib=rss_bytes(pids) / 2**20)


class OwnCpuMeter:
    """This process's CPU (the generator), between start() and stop()."""

    def __init__(self) -> None:
        self._cpu = 0.0
        self._wall = 0.0

    def start(self) -> None:
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def stop(self) -> float:
        return (time.process_time() - self._cpu) / max(time.monotonic() - self._wall, 1e-9)


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a process tree to `cpus` (threads started later inherit it)."""
    for process in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in (PROC / str(process) / "task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)


def pin_self(cpus: set[int]) -> None:
    for task in (PROC / "self" / "task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def raise_file_limit() -> int:
    """Raise the soft limit on open files to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def loadavg() -> str:
    try:
        return " ".join((PROC / "loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and the files changed on top of it."""
    root = Path(__file__).resolve().parents[3]
    state: dict[str, Any] = {"checkout": str(root)}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(  # noqa: S603 - fixed git command
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],  # noqa: S607 - git on PATH
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        status = subprocess.run(  # noqa: S603 - fixed git command
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        state["commit"] = head.stdout.strip()
        state["src_changes"] = [line[3:] for line in status.stdout.splitlines()]
    return state


def machine() -> dict[str, Any]:
    """What a reader needs to judge the figures: cores, CPU model, RAM, kernel, load."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": loadavg(),
        "source": source_state(),
    }
