"""(c) Idle authenticated connections: handshakes/s and RSS per connection."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

from chat_service.bench import report as rpt
from chat_service.bench.load import Member, Swarm
from chat_service.bench.proc import OwnCpuMeter, process_tree, rss_bytes
from chat_service.bench.report import ScenarioReport
from chat_service.bench.runner import Bench, Live
from chat_service.bench.scenarios.common import (
    ConnectionsConfig,
)
from chat_service.bench.servers import (
    CHAT_SERVICE,
)
from chat_service.bench.stats import Percentiles, median, new_samples

log = logging.getLogger(__name__)


# --- (c) connections ------------------------------------------------------------------------


async def connections(
    bench: Bench, config: ConnectionsConfig, command: list[str]
) -> ScenarioReport:
    report = ScenarioReport(
        scenario="connections",
        title=f"Connections: {config.connections:,} idle authenticated sockets",
        config=asdict(config),
        command=command,
    )
    runs: list[dict[str, Any]] = []
    for round_no in range(1, bench.options.rounds + 1):
        for spec in bench.specs():
            env = {"MAX_CONNECTIONS_PER_USER": str(config.per_user)}
            async with bench.launch(spec, **env) as live:
                runs.append(await _connections_run(bench, live, round_no, config))
    report.summary["runs"] = runs
    medians = _connection_medians(runs)
    report.summary["medians"] = medians
    report.sections += [
        rpt.table(
            [
                "target",
                "opened",
                "failed",
                "handshakes/s",
                "handshake p99 ms",
                "RSS before MiB",
                "RSS after MiB",
                "KiB per connection",
                "server CPU while connecting",
                "server CPU while idle",
            ],
            (
                [
                    m["target"],
                    rpt.fmt(m["opened"], 0),
                    rpt.fmt(m["failed"], 0),
                    rpt.fmt(m["handshakes_per_s"], 0),
                    rpt.fmt(m["handshake_p99_ms"]),
                    rpt.fmt(m["rss_before_mib"], 0),
                    rpt.fmt(m["rss_after_mib"], 0),
                    rpt.fmt(m["kib_per_connection"]),
                    rpt.fmt(m["server_cpu"], 2),
                    rpt.fmt(m["server_cpu_idle"], 2),
                ]
                for m in medians
            ),
        ),
    ]
    chat = next((m for m in medians if m["target"] == CHAT_SERVICE), None)
    if chat is not None:
        rss_met = chat["kib_per_connection"] is not None and chat["kib_per_connection"] <= 35
        rate_met = chat["handshakes_per_s"] is not None and chat["handshakes_per_s"] >= 1000
        all_open = chat["failed"] == 0 and chat["opened"] >= config.connections
        report.summary["targets"] = {
            "rss_per_connection_le_35_kib": rss_met,
            "handshakes_ge_1000_per_s": rate_met,
            "all_open": all_open,
        }
        report.sections += [
            f"Targets: {config.connections:,} sockets open: {'yes' if all_open else 'NO'}; "
            f"≤ 35 KiB each: {'met' if rss_met else 'NOT met'}; ≥ 1,000 handshakes/s: "
            f"{'met' if rate_met else 'NOT met'}.",
            "",
        ]
    return report


def _connection_medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = list(dict.fromkeys(run["target"] for run in runs))
    keys = [
        "opened",
        "failed",
        "handshakes_per_s",
        "handshake_p99_ms",
        "rss_before_mib",
        "rss_after_mib",
        "kib_per_connection",
        "server_cpu",
        "server_cpu_idle",
    ]
    return [
        {
            "target": target,
            "runs": sum(run["target"] == target for run in runs),
            **{key: median(run[key] for run in runs if run["target"] == target) for key in keys},
        }
        for target in targets
    ]


async def _connections_run(
    bench: Bench, live: Live, round_no: int, config: ConnectionsConfig
) -> dict[str, Any]:
    per_user = config.per_user if live.protocol == "chat" else 1
    population = bench.population(live)
    accounts = await population.ensure_accounts(math.ceil(config.connections / per_user))
    swarm = Swarm(live.host, live.port, live.protocol)
    members = [swarm.add(accounts[i // per_user], None) for i in range(config.connections)]
    live.pin()
    await asyncio.sleep(1.0)
    pids = process_tree(live.pid) if live.pid else []
    rss_before = rss_bytes(pids)
    meter = live.meter()
    generator = OwnCpuMeter()
    gate = asyncio.Semaphore(config.concurrency)
    times = new_samples()
    failures: Counter[str] = Counter()

    async def one(member: Member) -> None:
        async with gate:
            started = time.perf_counter_ns()
            try:
                await swarm.open(member, timeout_s=60)
            except (OSError, ConnectionError, TimeoutError) as exc:
                failures[type(exc).__name__ + ": " + str(exc)[:60]] += 1
                return
            times.append(time.perf_counter_ns() - started)

    try:
        meter.start()
        generator.start()
        started = time.perf_counter()
        async with bench.profiling(live, "connections"):
            await asyncio.gather(*(one(member) for member in members))
        elapsed = time.perf_counter() - started
        usage = meter.stop()
        generator_cpu = generator.stop()
        idle = live.meter()
        idle.start()
        await asyncio.sleep(config.hold_s)  # idle: nothing may be shed, memory settles
        idle_usage = idle.stop()
        rss_after = rss_bytes(process_tree(live.pid)) if live.pid else 0
        still_open = sum(member.is_open for member in members)
    finally:
        await swarm.close_all()
    opened = len(times)
    latency = Percentiles.of_ns(times)
    result = {
        "target": live.name,
        "round": round_no,
        "connections": config.connections,
        "opened": opened,
        "failed": config.connections - opened,
        "failures": dict(failures),
        "open_after_hold": still_open,
        "seconds": elapsed,
        "handshakes_per_s": opened / elapsed if elapsed else None,
        "handshake_p50_ms": latency.p50 if latency else None,
        "handshake_p99_ms": latency.p99 if latency else None,
        "rss_before_mib": rss_before / 2**20 if live.pid else None,
        "rss_after_mib": rss_after / 2**20 if live.pid else None,
        "kib_per_connection": (rss_after - rss_before) / 1024 / opened
        if live.pid and opened
        else None,
        "server_cpu": usage.cpu if usage else None,
        "server_cpu_idle": idle_usage.cpu if idle_usage else None,
        "generator_cpu": generator_cpu,
    }
    log.info("%s round %d: %s", live.name, round_no, result)
    return result
