"""(d) Join with history, and REST history pages, in a room of 1,000,000 stored messages."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from typing import Any

import httpx

from chat_service.bench import report as rpt
from chat_service.bench.accounts import API, Account
from chat_service.bench.load import Member, Swarm
from chat_service.bench.proc import cpu_seconds, process_tree
from chat_service.bench.report import ScenarioReport
from chat_service.bench.runner import Bench
from chat_service.bench.scenarios.common import (
    HistoryConfig,
)
from chat_service.bench.servers import (
    CHAT_SERVICE,
    connect_database,
)
from chat_service.bench.stats import Percentiles, new_samples

log = logging.getLogger(__name__)


# --- (d) history ----------------------------------------------------------------------------


async def history(bench: Bench, config: HistoryConfig, command: list[str]) -> ScenarioReport:
    report = ScenarioReport(
        scenario="history",
        title=f"Join with history in a room of {config.messages:,} messages",
        config=asdict(config),
        command=command,
    )
    spec = bench.specs((CHAT_SERVICE,))[0]
    database_url = await bench.database_url()
    rows: list[dict[str, Any]] = []
    async with bench.launch(spec) as live:
        population = bench.population(live)
        owner = (await population.ensure_accounts(1))[0]
        big = await population.ensure_room("history-big", owner)
        small = await population.ensure_room("history-small", owner)
        loaded = await _bulk_load(database_url, big, owner.user_id, config.messages)
        await _bulk_load(database_url, small, owner.user_id, config.small_messages)
        report.summary["bulk_load_s"] = loaded
        live.pin()
        swarm = Swarm(live.host, live.port, live.protocol)
        member = swarm.add(owner, None)
        await swarm.open(member)
        try:
            async with (
                httpx.AsyncClient(base_url=live.base_url, timeout=30) as http,
                bench.profiling(live, "history"),
            ):
                for room_id, size in ((big, config.messages), (small, config.small_messages)):
                    rows += await _history_calls(
                        swarm, member, http, owner, room_id, size, config.requests, live.pid
                    )
        finally:
            await swarm.close_all()
    report.summary["calls"] = rows
    report.sections += [
        "Round trips measured by the client on the same machine (an upper bound of server "
        "time: they include loopback, the client's own parsing, and any wait for a CPU on a "
        "busy machine), one call at a time, and the server's CPU time per call (its own work, "
        "without those waits; read from /proc):",
        "",
        rpt.table(
            [
                "call",
                "room size",
                "messages returned",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "server CPU ms per call",
            ],
            (
                [
                    row["call"],
                    f"{row['room_messages']:,}",
                    str(row["returned"]),
                    rpt.fmt(row["p50_ms"], 2),
                    rpt.fmt(row["p90_ms"], 2),
                    rpt.fmt(row["p99_ms"], 2),
                    rpt.fmt(row["max_ms"], 2),
                    rpt.fmt(row["server_cpu_ms_per_call"], 2),
                ]
                for row in rows
            ),
        ),
    ]
    join = next(r for r in rows if r["call"].startswith("ws join") and r["room_messages"] > 1000)
    met = join["p99_ms"] is not None and join["p99_ms"] <= 10
    report.summary["target_join_p99_le_10_ms"] = met
    report.sections += [
        f"Target: join with history p99 ≤ 10 ms: {rpt.fmt(join['p99_ms'], 2)} ms round trip: "
        f"{'met' if met else 'NOT met'}.",
        "",
    ]
    return report


async def _bulk_load(database_url: str, room_id: str, author_id: str, count: int) -> float:
    """Write `count` messages straight into Postgres (one INSERT ... SELECT generate_series)."""
    connection = await connect_database(database_url)
    started = time.perf_counter()
    try:
        last_seq = await connection.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room_id)
        if last_seq and last_seq >= count:
            return 0.0
        async with connection.transaction():
            await connection.execute(
                """
                INSERT INTO messages (id, room_id, seq, change_seq, author_id, body, client_id,
                                      created_at, edited_at, deleted)
                SELECT md5($1 || ':' || g), $1, g, g, $2,
                       'history message ' || g || ' ' || repeat('x', 40), NULL,
                       now() - make_interval(secs => ($3 - g) / 10.0), NULL, false
                FROM generate_series($4::bigint + 1, $3::bigint) AS g
                """,
                room_id,
                author_id,
                count,
                last_seq or 0,
            )
            await connection.execute("UPDATE rooms SET last_seq = $2 WHERE id = $1", room_id, count)
        await connection.execute("ANALYZE messages")
    finally:
        await connection.close()
    took = time.perf_counter() - started
    log.info("bulk-loaded %d messages in %.1f s", count, took)
    return took


async def _history_calls(
    swarm: Swarm,
    member: Member,
    http: httpx.AsyncClient,
    owner: Account,
    room_id: str,
    size: int,
    requests: int,
    pid: int | None,
) -> list[dict[str, Any]]:
    rng = random.Random(7)  # noqa: S311 - which page to read, not a secret
    headers = owner.ws_headers()
    path = f"{API}/rooms/{room_id}/messages"

    async def ws(frame: dict[str, Any]) -> int:
        reply = await swarm.request(member, frame)
        if reply.get("type") != "joined":
            raise RuntimeError(f"join failed: {reply}")
        return len(reply["messages"])

    async def rest(params: dict[str, Any]) -> int:
        response = await http.get(path, params=params, headers=headers)
        response.raise_for_status()
        return len(response.json()["items"])

    calls: list[tuple[str, Any]] = [
        ("ws join (last 50)", lambda: ws({"type": "join", "room_id": room_id, "limit": 50})),
        (
            "ws join since_seq (100 behind)",
            lambda: ws({"type": "join", "room_id": room_id, "since_seq": size - 100}),
        ),
        ("REST latest page (50)", lambda: rest({"limit": 50})),
        (
            "REST before_seq (random page, 50)",
            lambda: rest({"limit": 50, "before_seq": rng.randint(51, size)}),
        ),
        (
            "REST after_seq (random page, 50)",
            lambda: rest({"limit": 50, "after_seq": rng.randint(0, size - 50)}),
        ),
    ]
    rows = []
    for name, call in calls:
        for _ in range(5):  # warm: pool connections, statement caches
            await call()
        samples = new_samples()
        returned = 0
        cpu_before = cpu_seconds(process_tree(pid)) if pid else 0.0
        for _ in range(requests):
            started = time.perf_counter_ns()
            returned = await call()
            samples.append(time.perf_counter_ns() - started)
        # One call at a time: the server's CPU per call is its own work, without the waits.
        cpu_ms = (cpu_seconds(process_tree(pid)) - cpu_before) / requests * 1000 if pid else None
        stats = Percentiles.of_ns(samples)
        assert stats is not None
        rows.append(
            {
                "call": name,
                "room_messages": size,
                "returned": returned,
                "count": stats.count,
                "p50_ms": stats.p50,
                "p90_ms": stats.p90,
                "p99_ms": stats.p99,
                "max_ms": stats.max,
                "server_cpu_ms_per_call": cpu_ms,
            }
        )
    return rows
