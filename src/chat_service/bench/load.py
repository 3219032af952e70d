"""The load generator's core: a swarm of WebSocket clients, an open-loop sender, and the
counters one measured step reads.

Every message body starts with `<perf_counter_ns at send>:<step>:<n>:`, so latency is taken
in one clock, in this process, when the frame is parsed. Sends follow a fixed schedule
whatever the server does (open loop): a slow server shows up as latency and loss, not as a
politely lower offered load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from chat_service.bench.accounts import Account, Protocol
from chat_service.bench.proc import CpuMeter, OwnCpuMeter, loadavg
from chat_service.bench.stats import Percentiles, StepResult, new_samples
from chat_service.bench.wsclient import WsClient, connect

log = logging.getLogger(__name__)

# Every server frame of chat-service and of the baselines starts with its type.
FRAME_TYPE = re.compile(rb'\{"type":"([^"]+)"')
BODY_STAMP = re.compile(rb'"body":"(\d+):(\d+):(\d+):')
MESSAGE_NEW = b"message.new"
ACK = b"ack"
HELLO = b"hello"
REPLIES = frozenset({b"joined", b"error", b"left", b"pong"})
RETRYABLE = frozenset({"unavailable", "rate_limited"})
MIN_TICK_S = 0.002


def frame_type(payload: bytes) -> bytes:
    match = FRAME_TYPE.match(payload)
    if match is not None:
        return match.group(1)
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        return str(orjson.loads(payload).get("type", "")).encode()
    return b""


@dataclass
class Recorder:
    """What one step saw."""

    step: int
    keep_arrivals: bool = False
    started_ns: int = field(default_factory=time.perf_counter_ns)
    latencies: Any = field(default_factory=new_samples)
    arrivals: Any = field(default_factory=new_samples)  # receipt time since start, ns
    ack_latencies: Any = field(default_factory=new_samples)
    delivered: int = 0
    acks: int = 0
    late: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_delivery_ns: int = 0

    def message(self, payload: bytes, now: int) -> None:
        stamp = BODY_STAMP.search(payload)
        if stamp is None:
            self.errors["unparsable_frame"] += 1
            return
        if int(stamp.group(2)) != self.step:
            self.late += 1
            return
        self.delivered += 1
        self.latencies.append(now - int(stamp.group(1)))
        self.last_delivery_ns = now
        if self.keep_arrivals:
            self.arrivals.append(now - self.started_ns)

    def ack(self, payload: bytes, now: int) -> None:
        stamp = BODY_STAMP.search(payload)
        if stamp is not None and int(stamp.group(2)) == self.step:
            self.acks += 1
            self.ack_latencies.append(now - int(stamp.group(1)))


class Member:
    """One client of the swarm: an account, its room, its connection."""

    def __init__(self, swarm: Swarm, account: Account, room_id: str | None) -> None:
        self.swarm = swarm
        self.account = account
        self.room_id = room_id
        self.client: WsClient | None = None
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_text(self, _client: WsClient, payload: bytes) -> None:
        kind = frame_type(payload)
        if kind == MESSAGE_NEW:
            self.swarm.recorder.message(payload, time.perf_counter_ns())
        elif kind == ACK:
            self.swarm.recorder.ack(payload, time.perf_counter_ns())
            if self.swarm.awaiting:
                self.swarm.reply(kind, payload)
        elif kind == HELLO:
            if not self.hello.done():
                self.hello.set_result(None)
        elif kind in REPLIES:
            self.swarm.reply(kind, payload)
        self.swarm.frames += 1
        self.swarm.last_frame = time.monotonic()

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_open


class Swarm:
    """Clients of one target, and the counters of the step being measured."""

    def __init__(self, host: str, port: int, protocol: Protocol) -> None:
        self.host = host
        self.port = port
        self.protocol = protocol
        self.members: list[Member] = []
        self.recorder = Recorder(step=0)
        self.frames = 0
        self.last_frame = time.monotonic()
        self.run_tag = secrets.token_hex(4)  # client ids never repeat across runs
        self._step = 0
        self._refs = 0
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # --- connecting and joining --------------------------------------------------------------

    def add(self, account: Account, room_id: str | None) -> Member:
        member = Member(self, account, room_id)
        self.members.append(member)
        return member

    async def open(
        self, member: Member, *, rcvbuf: int | None = None, timeout_s: float = 60
    ) -> None:
        """Connect and wait for the server's first frame (after authentication)."""
        member.client = await connect(
            self.host,
            self.port,
            "/ws",
            member.account.ws_headers(),
            on_text=member.on_text,
            rcvbuf=rcvbuf,
            timeout_s=timeout_s,
        )
        waiting: set[asyncio.Future[Any]] = {member.hello, member.client.closed}
        done, _ = await asyncio.wait(
            waiting,
            timeout=timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if member.hello not in done:
            code = member.client.close_code
            member.client.abort()
            raise ConnectionError(f"no hello (close code {code})")

    async def request(
        self, member: Member, frame: dict[str, Any], timeout_s: float = 60
    ) -> dict[str, Any]:
        """Send a frame with a fresh ref and wait for the reply that echoes it."""
        assert member.client is not None
        self._refs += 1
        ref = f"r{self._refs}"
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[ref] = waiter
        member.client.send_text(orjson.dumps({**frame, "ref": ref}))
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        finally:
            self._waiters.pop(ref, None)

    async def join(self, member: Member, timeout_s: float = 60, attempts: int = 5) -> None:
        """Join the member's room; a busy server (`unavailable`, `rate_limited`) is retried."""
        assert member.room_id is not None
        frame = {"type": "join", "room_id": member.room_id, "limit": 1}
        for attempt in range(attempts):
            reply = await self.request(member, frame, timeout_s)
            if reply.get("type") == "joined":
                return
            if reply.get("code") not in RETRYABLE or attempt == attempts - 1:
                break
            await asyncio.sleep(float(reply.get("retry_after") or 1))
        raise ConnectionError(f"join refused: {reply}")

    async def open_all(
        self, members: Sequence[Member], *, join: bool, concurrency: int = 20
    ) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def one(member: Member) -> None:
            async with gate:
                await self.open(member)
                if join:
                    await self.join(member)

        await asyncio.gather(*(one(member) for member in members))

    @property
    def awaiting(self) -> bool:
        """Some request() waits for its reply."""
        return bool(self._waiters)

    def reply(self, kind: bytes, payload: bytes) -> None:
        frame: dict[str, Any] = orjson.loads(payload)
        ref = frame.get("ref")
        waiter = self._waiters.get(ref) if isinstance(ref, str) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        elif kind == b"error":
            self.recorder.errors[str(frame.get("code"))] += 1

    async def settle(self, quiet_s: float = 0.5, timeout_s: float = 60.0) -> None:
        """Wait until no frame has come for `quiet_s` (presence storms after joins)."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            wait = min(self.last_frame + quiet_s, deadline) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def close_all(self) -> None:
        for member in self.members:
            if member.client is not None:
                member.client.abort()
        await asyncio.sleep(0)

    def room_sizes(self) -> Counter[str]:
        return Counter(m.room_id for m in self.members if m.room_id is not None and m.is_open)

    # --- a measured step -----------------------------------------------------------------------

    def begin_step(self, keep_arrivals: bool = False) -> Recorder:
        self._step += 1
        self.recorder = Recorder(step=self._step, keep_arrivals=keep_arrivals)
        return self.recorder

    def message_frame(self, member: Member, n: int, body_chars: int) -> tuple[bytes, int]:
        sent_at = time.perf_counter_ns()
        prefix = f"{sent_at}:{self._step}:{n}:"
        body = prefix + "x" * max(1, body_chars - len(prefix))
        frame = {
            "type": "message.send",
            "room_id": member.room_id,
            "body": body,
            "client_id": f"{self.run_tag}.{self._step}.{n}",
            "ref": n,
        }
        return orjson.dumps(frame), sent_at


@dataclass
class Offer:
    sent: int
    expected: int
    lag_ms: float


async def offer(
    swarm: Swarm,
    senders: Sequence[Member],
    rate_per_s: float,
    duration_s: float,
    body_chars: int,
) -> Offer:
    """Send `rate_per_s` messages a second for `duration_s`, round-robin over `senders`,
    on a fixed schedule (open loop). Returns what was sent and how late the sender ran."""
    sizes = swarm.room_sizes()
    total = max(1, round(rate_per_s * duration_s))
    start = time.perf_counter()
    n = expected = 0
    worst_lag = 0.0
    while n < total:
        due = min(total, int((time.perf_counter() - start) * rate_per_s) + 1)
        while n < due:
            member = senders[n % len(senders)]
            if member.client is not None and member.is_open:
                frame, sent_at = swarm.message_frame(member, n, body_chars)
                member.client.send_text(frame)
                expected += sizes[member.room_id or ""]
                worst_lag = max(worst_lag, sent_at / 1e9 - start - n / rate_per_s)
            n += 1
        # At least a tick between wake-ups: thousands of tiny sleeps a second would cost the
        # generator more than the sends; what falls due meanwhile goes out together.
        wait = start + n / rate_per_s - time.perf_counter()
        await asyncio.sleep(max(MIN_TICK_S, wait))
    return Offer(sent=total, expected=expected, lag_ms=worst_lag * 1000)


async def drain(
    swarm: Swarm, expected: int, acks_expected: int, timeout_s: float, poll_s: float = 0.01
) -> None:
    """Wait for every expected delivery and ack, or for the timeout."""
    deadline = time.monotonic() + timeout_s
    recorder = swarm.recorder
    while time.monotonic() < deadline:
        answered = recorder.acks + sum(recorder.errors.values())
        if recorder.delivered >= expected and answered >= acks_expected:
            return
        await asyncio.sleep(poll_s)


async def measure_step(
    swarm: Swarm,
    senders: Sequence[Member],
    *,
    target: str,
    round_no: int,
    label: str,
    rate_per_s: float,
    duration_s: float,
    body_chars: int,
    drain_s: float,
    server: CpuMeter,
    keep_arrivals: bool = False,
    others: dict[str, CpuMeter] | None = None,
) -> StepResult:
    """One step: offer the load, wait for the deliveries, and read every counter."""
    recorder = swarm.begin_step(keep_arrivals)
    generator = OwnCpuMeter()
    generator.start()
    server.start()
    others = others or {}
    for meter in others.values():
        meter.start()
    started = time.perf_counter_ns()
    sent = await offer(swarm, senders, rate_per_s, duration_s, body_chars)
    acks_expected = sent.sent if swarm.protocol == "chat" else 0
    await drain(swarm, sent.expected, acks_expected, drain_s)
    usage = server.stop()
    generator_cpu = generator.stop()
    other_cpu = {name: meter.stop() for name, meter in others.items()}
    window_s = max(duration_s, (recorder.last_delivery_ns - started) / 1e9)
    closes = Counter(
        str(m.client.close_code)
        for m in swarm.members
        if m.client is not None and m.client.close_code is not None
    )
    result = StepResult(
        target=target,
        round=round_no,
        label=label,
        offered_per_s=rate_per_s,
        duration_s=duration_s,
        sent=sent.sent,
        expected=sent.expected,
        delivered=recorder.delivered,
        lost=max(0, sent.expected - recorder.delivered),
        late=recorder.late,
        acks=recorder.acks,
        delivered_per_s=recorder.delivered / window_s,
        acks_per_s=recorder.acks / window_s if swarm.protocol == "chat" else None,
        latency_ms=Percentiles.of_ns(recorder.latencies),
        ack_latency_ms=Percentiles.of_ns(recorder.ack_latencies),
        errors=dict(recorder.errors),
        closes=dict(closes),
        server_cpu=usage.cpu if usage else None,
        server_rss_mib=usage.rss_mib if usage else None,
        generator_cpu=generator_cpu,
        send_lag_ms=sent.lag_ms,
        extra={
            "loadavg": loadavg(),
            **{f"{name}_cpu": used.cpu for name, used in other_cpu.items() if used is not None},
        },
    )
    log.info(
        "%s round %d %s: %.0f/s offered, p99 %s ms, lost %d, errors %s, server cpu %s",
        target,
        round_no,
        label,
        rate_per_s,
        f"{result.latency_ms.p99:.1f}" if result.latency_ms else "-",
        result.lost,
        result.errors or "none",
        f"{result.server_cpu:.2f}" if result.server_cpu is not None else "-",
    )
    return result
