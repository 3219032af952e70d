"""(e) A login storm during a fan-out, alternating with the same fan-out without it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import httpx

from chat_service.bench import report as rpt
from chat_service.bench.accounts import Account, login
from chat_service.bench.load import Member, Swarm, measure_step
from chat_service.bench.report import ScenarioReport
from chat_service.bench.runner import Bench, Live
from chat_service.bench.scenarios.common import (
    StormConfig,
    median_of,
    room_swarm,
)
from chat_service.bench.servers import (
    CHAT_SERVICE,
)
from chat_service.bench.stats import P99_TARGET_MS, Percentiles, StepResult, new_samples

# --- (e) login storm ------------------------------------------------------------------------


async def login_storm(bench: Bench, config: StormConfig, command: list[str]) -> ScenarioReport:
    report = ScenarioReport(
        scenario="login-storm",
        title=(
            f"Login storm: {config.logins_per_s:g} logins/s during fan-out "
            f"({config.members} members, {config.rate:g} msg/s)"
        ),
        config=asdict(config),
        command=command,
    )
    spec = bench.specs((CHAT_SERVICE,))[0]
    async with bench.launch(spec) as live:
        swarm, members, accounts = await room_swarm(
            bench, live, config.members, f"fanout-{config.members}"
        )
        try:
            live.pin()
            async with bench.profiling(live, "login-storm"):
                await _storm_steps(report, swarm, members, accounts, live, bench, config)
        finally:
            await swarm.close_all()
    quiet = [s for s in report.steps if s.label == "quiet"]
    storm = [s for s in report.steps if s.label == "storm"]
    rows = []
    for name, steps in (("quiet", quiet), ("storm", storm)):
        rows.append(
            [
                name,
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.p50 if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.p99 if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.max if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: float(s.lost)), 0),
                rpt.fmt(median_of(steps, lambda s: s.server_cpu), 2),
                rpt.fmt(median_of(steps, lambda s: s.extra.get("logins_per_s")), 1),
                rpt.fmt(median_of(steps, lambda s: s.extra.get("login_p50_ms"))),
                rpt.fmt(median_of(steps, lambda s: s.extra.get("login_p99_ms"))),
                str(sum(sum(s.extra.get("login_failures", {}).values()) for s in steps)),
            ]
        )
    storm_p99 = median_of(storm, lambda s: s.latency_ms.p99 if s.latency_ms else None)
    met = (
        storm_p99 is not None
        and storm_p99 <= P99_TARGET_MS
        and all(s.lost == 0 and not s.errors for s in storm)
    )
    report.summary["target_chat_p99_le_50_ms_during_storm"] = met
    report.sections += [
        "Medians over rounds (quiet and storm steps alternate on the same server):",
        "",
        rpt.table(
            [
                "phase",
                "chat p50 ms",
                "chat p99 ms",
                "chat max ms",
                "lost",
                "server CPU",
                "logins/s done",
                "login p50 ms",
                "login p99 ms",
                "login failures",
            ],
            rows,
        ),
        f"Target: chat p99 ≤ 50 ms while passwords are hashed: {rpt.fmt(storm_p99)} ms: "
        f"{'met' if met else 'NOT met'}.",
        "",
    ]
    return report


async def _storm_steps(
    report: ScenarioReport,
    swarm: Swarm,
    members: list[Member],
    accounts: list[Account],
    live: Live,
    bench: Bench,
    config: StormConfig,
) -> None:
    meter = live.meter()
    senders = members[: config.senders]

    async def step(label: str, round_no: int, duration_s: float) -> StepResult:
        return await measure_step(
            swarm,
            senders,
            target=live.name,
            round_no=round_no,
            label=label,
            rate_per_s=config.rate,
            duration_s=duration_s,
            body_chars=config.body_chars,
            drain_s=config.drain_s,
            server=meter,
            others=bench.infra_meters(),
        )

    await step("warm-up", 0, 1.0)
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as http:
        for round_no in range(1, bench.options.rounds + 1):
            for storming in (False, True):
                await swarm.settle(0.3, 10)
                stop = asyncio.Event()
                stats: dict[str, Any] = {}
                storm = (
                    asyncio.create_task(_logins(http, accounts, config.logins_per_s, stop, stats))
                    if storming
                    else None
                )
                result = await step("storm" if storming else "quiet", round_no, config.duration_s)
                stop.set()
                if storm is not None:
                    await storm
                result.extra.update(stats)
                report.steps.append(result)


async def _logins(
    http: httpx.AsyncClient,
    accounts: list[Account],
    per_s: float,
    stop: asyncio.Event,
    stats: dict[str, Any],
) -> None:
    """Log in at a fixed rate (open loop), each login a task of its own."""
    samples = new_samples()
    failures: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(username: str) -> None:
        started = time.perf_counter_ns()
        try:
            response = await login(http, username)
        except httpx.HTTPError as exc:
            failures[type(exc).__name__] += 1
            return
        if response.status_code == 200:
            samples.append(time.perf_counter_ns() - started)
        else:
            failures[str(response.status_code)] += 1

    started = time.perf_counter()
    n = 0
    while not stop.is_set():
        task = asyncio.create_task(one(accounts[n % len(accounts)].username))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, started + n / per_s - time.perf_counter()))
    elapsed = time.perf_counter() - started
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    latency = Percentiles.of_ns(samples)
    stats.update(
        {
            "logins_offered": n,
            "logins_ok": len(samples),
            "logins_per_s": len(samples) / elapsed if elapsed else None,
            "login_p50_ms": latency.p50 if latency else None,
            "login_p99_ms": latency.p99 if latency else None,
            "login_failures": dict(failures),
        }
    )
