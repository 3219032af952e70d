"""Soak test: connection churn and chat for a long time, with the server's resources sampled.

Runs outside CI. It starts its own `chat-service serve` (SQLite in the output directory, or
`--database-url`), or drives a running one (`--url`, plus `--pid` to read its /proc):

    uv run python bench/soak.py --duration 3600
    uv run python bench/soak.py --url http://127.0.0.1:8000 --pid 12345 --duration 3600

Load: `--chatters` sockets that each live 30-120 s in one or two rooms sending messages and
then reconnect, resuming with since_seq; `--churn-rate` short-lived sockets per second
(header, subprotocol and ticket auth in turn) that join a room and leave; a REST reader.
Every `--sample-every` seconds it records the server's RSS, open file descriptors and
threads (/proc), its asyncio tasks, sockets and hub entries (/metrics), and client counters.

After the load it stops every client, waits for the server to see them go, and samples the
idle server again: tasks, descriptors and hub entries must come back to their level before
the load, and RSS should stay flat over the run (a slope near 0 MB/h in the second half).

Writes <out>/soak-<stamp>.csv (samples), .json (settings and summary) and .png (chart; needs
the `bench` extra: `uv sync --extra bench`). A server started here must allow the signups:
a server given by `--url` needs SIGNUP_IP_LIMIT raised (e.g. `10000/hour`).
"""

# Load generation, not cryptography (S311); the only command run is our own server (S603).
# ruff: noqa: S311, S603

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import itertools
import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

log = logging.getLogger("soak")

API = "/api/v1"
PASSWORD = "soak password, long enough"
OPEN_TIMEOUT_S = 10.0
IDLE_WAIT_S = 60.0
SETTLE_S = 10.0  # after the last socket went: uvicorn's abort timers, GC
MAX_CHURNING = 50  # short-lived sockets open at once, at most


@dataclass
class Options:
    url: str | None
    pid: int | None
    duration: float
    database_url: str | None
    users: int
    rooms: int
    chatters: int
    send_interval: float
    churn_rate: float
    sample_every: float
    out: Path


@dataclass
class Stats:
    """Client-side counters, shared by every load task."""

    sent: int = 0
    acked: int = 0
    received: int = 0
    connects: int = 0
    churned: int = 0
    resumed: int = 0
    http_errors: int = 0
    error_frames: Counter[str] = field(default_factory=Counter)
    ack_latencies: list[float] = field(default_factory=list)  # since the last sample
    closes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


@dataclass
class Sample:
    t: float
    phase: str
    rss_mb: float
    fds: int
    threads: int
    asyncio_tasks: float
    ws_connections: float
    hub_entries: float
    messages_stored: float
    frames_sent: float
    sent: int
    acked: int
    received: int
    connects: int
    churned: int
    http_errors: int
    ack_p50_ms: float
    ack_p99_ms: float
    db_in_use: float


class Account:
    """A user's tokens; refreshed (one at a time: a refresh token works once) when half-used."""

    def __init__(self, username: str, body: dict[str, Any]) -> None:
        self.username = username
        self.lock = asyncio.Lock()
        self._set(body)

    def _set(self, body: dict[str, Any]) -> None:
        self.access_token: str = body["access_token"]
        self.refresh_token: str = body["refresh_token"]
        self.renew_at = time.monotonic() + body["expires_in"] / 2

    async def token(self, http: httpx.AsyncClient) -> str:
        async with self.lock:
            if time.monotonic() >= self.renew_at:
                response = await http.post(
                    f"{API}/auth/refresh", json={"refresh_token": self.refresh_token}
                )
                response.raise_for_status()
                self._set(response.json())
            return self.access_token


class Soak:
    def __init__(self, options: Options, base_url: str, pid: int | None) -> None:
        self.options = options
        self.base_url = base_url
        self.ws_url = "ws" + base_url.removeprefix("http")
        self.pid = pid
        self.stats = Stats()
        self.samples: list[Sample] = []
        self.accounts: list[Account] = []
        self.rooms: list[str] = []
        self.last_seq: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self.started = time.monotonic()
        self.phase = "setup"
        self._client_ids = itertools.count()
        self._sent_at: dict[str, float] = {}
        self.all_ack_latencies: list[float] = []

    # --- setup -------------------------------------------------------------------------------

    async def setup(self, http: httpx.AsyncClient) -> None:
        run = secrets.token_hex(3)
        for n in range(self.options.users):
            username = f"soak_{run}_{n}"
            response = await http.post(
                f"{API}/auth/signup", json={"username": username, "password": PASSWORD}
            )
            if response.status_code != 201:
                raise SystemExit(f"signup failed ({response.status_code}): {response.text}")
            self.accounts.append(Account(username, response.json()))
        owner = await self.accounts[0].token(http)
        for n in range(self.options.rooms):
            response = await http.post(
                f"{API}/rooms",
                json={"name": f"soak {run} {n}"},
                headers={"Authorization": f"Bearer {owner}"},
            )
            response.raise_for_status()
            self.rooms.append(response.json()["id"])
        log.info("set up %d users and %d rooms", len(self.accounts), len(self.rooms))

    # --- load --------------------------------------------------------------------------------

    async def chatter(self, http: httpx.AsyncClient, account: Account) -> None:
        """Live 30-120 s in one or two rooms, sending; reconnect and resume; until stopped."""
        while not self.stopping.is_set():
            rooms = random.sample(self.rooms, k=min(len(self.rooms), random.choice((1, 2))))
            lifetime = random.uniform(30, 120)
            try:
                token = await account.token(http)
                headers = {"Authorization": f"Bearer {token}"}
                async with self._connect("/ws", additional_headers=headers) as ws:
                    await self._chat(ws, rooms, lifetime)
            except (OSError, TimeoutError, WebSocketException, httpx.HTTPError) as exc:
                self._failed(exc)
                await self._pause(1.0)

    async def _chat(self, ws: ClientConnection, rooms: list[str], lifetime: float) -> None:
        await self._expect(ws, "hello")
        for room_id in rooms:
            join: dict[str, Any] = {"type": "join", "room_id": room_id, "limit": 20}
            if room_id in self.last_seq:
                join["since_seq"] = self.last_seq[room_id]
                self.stats.resumed += 1
            await ws.send(json.dumps(join))
        reader = asyncio.create_task(self._read(ws))
        try:
            deadline = time.monotonic() + lifetime
            while time.monotonic() < deadline and not self.stopping.is_set():
                body = f"soak message {time.time():.3f} " + "x" * random.randint(0, 400)
                client_id = f"c{next(self._client_ids)}"
                frame = {"type": "message.send", "room_id": random.choice(rooms)}
                self._sent_at[client_id] = time.perf_counter()
                await ws.send(json.dumps({**frame, "body": body, "client_id": client_id}))
                self.stats.sent += 1
                await self._pause(random.expovariate(1 / self.options.send_interval))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame["type"]
            if kind == "ack":
                self.stats.acked += 1
                sent_at = self._sent_at.pop(frame["client_id"], None)
                if sent_at is not None:
                    self.stats.ack_latencies.append(time.perf_counter() - sent_at)
            elif kind == "message.new":
                self.stats.received += 1
                self._saw(frame["room_id"], frame["message"]["change_seq"])
            elif kind == "joined" and frame["messages"]:
                self._saw(frame["room_id"], frame["messages"][-1]["change_seq"])
            elif kind == "error":
                self.stats.error_frames[frame["code"]] += 1

    def _saw(self, room_id: str, change_seq: int) -> None:
        self.last_seq[room_id] = max(self.last_seq.get(room_id, 0), change_seq)

    async def churner(self, http: httpx.AsyncClient, accounts: list[Account]) -> None:
        """Short-lived sockets opened at about `churn_rate` per second (a Poisson process,
        whatever the server's speed), each auth method in turn."""
        running: set[asyncio.Task[None]] = set()
        for n in itertools.count():
            await self._pause(random.expovariate(self.options.churn_rate))
            if self.stopping.is_set():
                break
            if len(running) >= MAX_CHURNING:
                self.stats.failures["churn backlog"] += 1
                continue
            task = asyncio.create_task(self._churn(http, random.choice(accounts), n % 3))
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running, return_exceptions=True)

    async def _churn(self, http: httpx.AsyncClient, account: Account, method: int) -> None:
        try:
            await self._churn_once(http, account, method)
            self.stats.churned += 1
        except (OSError, TimeoutError, WebSocketException, httpx.HTTPError) as exc:
            self._failed(exc)

    async def _churn_once(self, http: httpx.AsyncClient, account: Account, method: int) -> None:
        token = await account.token(http)
        options: dict[str, Any] = {}
        path = "/ws"
        if method == 0:
            options["additional_headers"] = {"Authorization": f"Bearer {token}"}
        elif method == 1:
            options["subprotocols"] = [Subprotocol("chat.v1"), Subprotocol(f"bearer.{token}")]
        else:
            response = await http.post(
                f"{API}/auth/ws-ticket", headers={"Authorization": f"Bearer {token}"}
            )
            response.raise_for_status()
            path = f"/ws?ticket={response.json()['ticket']}"
        async with self._connect(path, **options) as ws:
            await self._expect(ws, "hello")
            room_id = random.choice(self.rooms)
            await ws.send(json.dumps({"type": "join", "room_id": room_id, "limit": 5}))
            await self._expect(ws, "joined")
            await ws.send(json.dumps({"type": "typing", "room_id": room_id}))
            await asyncio.sleep(random.uniform(0.1, 1.0))

    async def reader(self, http: httpx.AsyncClient) -> None:
        """REST traffic: room lists and history pages."""
        while not self.stopping.is_set():
            headers = {"Authorization": f"Bearer {await self.accounts[0].token(http)}"}
            room_id = random.choice(self.rooms)
            for path in (f"{API}/rooms", f"{API}/rooms/{room_id}/messages?limit=50"):
                response = await http.get(path, headers=headers)
                if response.status_code >= 400:
                    self.stats.http_errors += 1
            await self._pause(2.0)

    @contextlib.asynccontextmanager
    async def _connect(self, path: str, **options: Any) -> Any:
        async with connect(
            self.ws_url + path,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=5,
            compression=None,
            max_size=4 * 1024 * 1024,
            **options,
        ) as ws:
            self.stats.connects += 1
            try:
                yield ws
            finally:
                code = ws.close_code if ws.close_code is not None else 1000
                self.stats.closes[str(code)] += 1

    async def _expect(self, ws: ClientConnection, kind: str) -> dict[str, Any]:
        while True:
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == kind:
                return frame
            if frame["type"] == "error":
                self.stats.error_frames[frame["code"]] += 1

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
            self.stats.closes[str(exc.rcvd.code)] += 1
        elif isinstance(exc, InvalidStatus):
            self.stats.failures[f"http {exc.response.status_code}"] += 1
        else:
            self.stats.failures[type(exc).__name__] += 1

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    # --- sampling ----------------------------------------------------------------------------

    async def sample(self, http: httpx.AsyncClient) -> Sample:
        metrics = await scrape(http)
        proc = read_proc(self.pid) if self.pid else {}
        rss = proc.get("rss_mb", metrics.get("process_resident_memory_bytes", 0.0) / 2**20)
        fds = proc.get("fds", metrics.get("process_open_fds", 0.0))
        stats = self.stats
        latencies = sorted(stats.ack_latencies)
        self.all_ack_latencies.extend(latencies)
        stats.ack_latencies = []
        sample = Sample(
            t=round(time.monotonic() - self.started, 1),
            phase=self.phase,
            rss_mb=round(rss, 2),
            fds=int(fds),
            threads=int(proc.get("threads", 0)),
            asyncio_tasks=metrics.get("chat_asyncio_tasks", -1),
            ws_connections=metrics.get("chat_ws_connections", -1),
            hub_entries=metrics.get("chat_hub_entries", -1),
            messages_stored=metrics.get("chat_messages_stored_total", -1),
            frames_sent=metrics.get("chat_ws_frames_sent_total", -1),
            sent=stats.sent,
            acked=stats.acked,
            received=stats.received,
            connects=stats.connects,
            churned=stats.churned,
            http_errors=stats.http_errors,
            ack_p50_ms=round(percentile(latencies, 0.5) * 1000, 1),
            ack_p99_ms=round(percentile(latencies, 0.99) * 1000, 1),
            db_in_use=metrics.get('chat_db_pool_connections{state="in_use"}', -1),
        )
        self.samples.append(sample)
        return sample

    async def sampler(self, http: httpx.AsyncClient) -> None:
        while not self.stopping.is_set():
            sample = await self.sample(http)
            log.info(
                "t=%5.0fs rss=%.1f MB fds=%d tasks=%d sockets=%d acked=%d ack p50/p99=%.0f/%.0f ms",
                sample.t,
                sample.rss_mb,
                sample.fds,
                sample.asyncio_tasks,
                sample.ws_connections,
                sample.acked,
                sample.ack_p50_ms,
                sample.ack_p99_ms,
            )
            await self._pause(self.options.sample_every)

    async def wait_idle(self, http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + IDLE_WAIT_S
        while time.monotonic() < deadline:
            metrics = await scrape(http)
            if metrics.get("chat_ws_connections") == 0:
                return
            await asyncio.sleep(0.5)
        log.warning("the server still counts sockets %.0f s after the load", IDLE_WAIT_S)

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30, limits=limits) as http:
            await self.setup(http)
            self.phase = "before"
            for _ in range(3):
                await self.sample(http)
                await asyncio.sleep(1)
            self.phase = "load"
            chatters = self.accounts[: self.options.chatters]
            others = self.accounts[self.options.chatters :] or self.accounts
            tasks = [asyncio.create_task(self.chatter(http, a)) for a in chatters]
            tasks += [
                asyncio.create_task(self.churner(http, others)),
                asyncio.create_task(self.reader(http)),
                asyncio.create_task(self.sampler(http)),
            ]
            await asyncio.sleep(self.options.duration)
            self.stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.phase = "after"
            await self.wait_idle(http)
            await asyncio.sleep(SETTLE_S)
            for _ in range(3):
                await self.sample(http)
                await asyncio.sleep(1)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        before = [s for s in self.samples if s.phase == "before"]
        load = [s for s in self.samples if s.phase == "load"]
        after = [s for s in self.samples if s.phase == "after"]
        second_half = load[len(load) // 2 :]
        return {
            "duration_s": self.options.duration,
            "samples": len(self.samples),
            "rss_mb": {
                "before": before[-1].rss_mb,
                "load_min": min(s.rss_mb for s in load),
                "load_max": max(s.rss_mb for s in load),
                "load_end": load[-1].rss_mb,
                "after": after[-1].rss_mb,
                "second_half_slope_mb_per_h": round(slope(second_half) * 3600, 2),
            },
            "asyncio_tasks": {"before": before[-1].asyncio_tasks, "after": after[-1].asyncio_tasks},
            "fds": {
                "before": before[-1].fds,
                "load_min": min(s.fds for s in load),
                "load_max": max(s.fds for s in load),
                "after": after[-1].fds,
            },
            "asyncio_tasks_load_max": max(s.asyncio_tasks for s in load),
            "threads": {"before": before[-1].threads, "after": after[-1].threads},
            "hub_entries": {"before": before[-1].hub_entries, "after": after[-1].hub_entries},
            "ws_connections_max": max(s.ws_connections for s in load),
            "ack_latency_ms": {
                q: round(percentile(sorted(self.all_ack_latencies), p) * 1000, 1)
                for q, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))
            },
            "client": {
                **{k: v for k, v in asdict(self.stats).items() if isinstance(v, int)},
                "error_frames": dict(self.stats.error_frames),
                "closes": dict(self.stats.closes),
                "failures": dict(self.stats.failures),
            },
            "server": {
                "messages_stored": after[-1].messages_stored,
                "frames_sent": after[-1].frames_sent,
            },
        }


def percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slope(samples: list[Sample]) -> float:
    """Least-squares RSS slope, MB per second."""
    if len(samples) < 2:
        return 0.0
    ts = [s.t for s in samples]
    ys = [s.rss_mb for s in samples]
    mean_t, mean_y = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mean_t) ** 2 for t in ts)
    return sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, ys, strict=True)) / var


async def scrape(http: httpx.AsyncClient) -> dict[str, float]:
    """Samples by name (labelled ones summed, e.g. hub entries over kinds) and by
    `name{label="value"}` for single-label series."""
    response = await http.get("/metrics")
    response.raise_for_status()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            if len(sample.labels) == 1:
                ((label, label_value),) = sample.labels.items()
                values[f'{sample.name}{{{label}="{label_value}"}}'] = sample.value
    return values


def read_proc(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


# --- the server under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(options: Options) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    data = options.out / "soak-data"
    data.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DATABASE_URL": options.database_url or f"sqlite:///{data / 'chat.db'}",
        "DATA_DIR": str(data),
        "JWT_SECRET": secrets.token_urlsafe(48),
        "SIGNUP_IP_LIMIT": "100000/hour",
        "LOGIN_IP_LIMIT": "100000/minute",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "json",
    }
    log_file = (options.out / "soak-server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "chat_service", "serve", "--port", str(port)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited early; see {options.out / 'soak-server.log'}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready within 60 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# --- output ----------------------------------------------------------------------------------


def write_outputs(options: Options, soak: Soak, summary: dict[str, Any]) -> Path:
    stem = options.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    with stem.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(asdict(soak.samples[0])))
        writer.writeheader()
        writer.writerows(asdict(sample) for sample in soak.samples)
    settings = {k: str(v) for k, v in asdict(options).items()}
    stem.with_suffix(".json").write_text(
        json.dumps({"options": settings, "summary": summary}, indent=2) + "\n"
    )
    chart(soak.samples, stem.with_suffix(".png"))
    return stem


def chart(samples: list[Sample], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is missing (uv sync --extra bench): no chart")
        return
    panels = [
        (("rss_mb",), "RSS (MB)"),
        (("asyncio_tasks",), "asyncio tasks"),
        (("fds",), "open file descriptors"),
        (("ws_connections",), "WebSocket connections"),
        (("ack_p50_ms", "ack_p99_ms"), "ack p50, p99 (ms)"),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 9), sharex=True)
    minutes = [s.t / 60 for s in samples]
    load = [s.t / 60 for s in samples if s.phase == "load"]
    for axis, (names, label) in zip(axes, panels, strict=True):
        for name in names:
            axis.plot(minutes, [getattr(s, name) for s in samples], linewidth=1)
        axis.set_ylabel(label, fontsize=8)
        axis.grid(alpha=0.3)
        if load:
            axis.axvspan(load[0], load[-1], color="tab:orange", alpha=0.08)
    axes[-1].set_xlabel("minutes (shaded: load)")
    figure.suptitle("chat-service soak: churn + chat", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="that server's process id, for /proc figures")
    parser.add_argument("--duration", type=float, default=3600, help="seconds of load")
    parser.add_argument("--database-url", help="for the server started here (default: SQLite)")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--rooms", type=int, default=6)
    parser.add_argument("--chatters", type=int, default=40, help="long-lived chatting sockets")
    parser.add_argument(
        "--send-interval", type=float, default=2.0, help="mean seconds between a chatter's sends"
    )
    parser.add_argument("--churn-rate", type=float, default=2.0, help="short sockets per second")
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.users <= args.chatters:
        parser.error("--users must exceed --chatters (the rest churn)")
    return Options(**vars(args))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    options = parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    process = None
    if options.url:
        url, pid = options.url.rstrip("/"), options.pid
    else:
        process, url = start_server(options)
        pid = process.pid
        log.info("started the server: %s (pid %d)", url, pid)
    try:
        soak = Soak(options, url, pid)
        summary = asyncio.run(soak.run())
    finally:
        if process is not None:
            stop_server(process)
    stem = write_outputs(options, soak, summary)
    log.info("summary:\n%s", json.dumps(summary, indent=2))
    log.info("wrote %s.{csv,json,png}", stem)


if __name__ == "__main__":
    main()
