"""(f) A slow consumer: one member of a fan-out stops reading at the socket."""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import asdict
from typing import Any

from chat_service.bench import report as rpt
from chat_service.bench.load import Member, Swarm, measure_step
from chat_service.bench.report import ScenarioReport
from chat_service.bench.runner import Bench, Live
from chat_service.bench.scenarios.common import (
    SLOW_CLOSE_LOG,
    SlowConfig,
    chart,
    median_of,
    room_swarm,
)
from chat_service.bench.servers import (
    CHAT_SERVICE,
)
from chat_service.bench.stats import P99_TARGET_MS, Percentiles, StepResult

# --- (f) slow consumer ------------------------------------------------------------------------


async def slow_consumer(bench: Bench, config: SlowConfig, command: list[str]) -> ScenarioReport:
    report = ScenarioReport(
        scenario="slow-consumer",
        title=(
            f"Slow consumer: one of {config.members + 1} members stops reading "
            f"({config.rate:g} msg/s of {config.body_chars} chars)"
        ),
        config=asdict(config),
        command=command,
    )
    timelines: dict[str, list[tuple[float, float, int]]] = {}
    for round_no in range(1, bench.options.rounds + 1):
        for spec in bench.specs():
            # INFO: the 4408 close is logged (connections log only when they open and close).
            async with bench.launch(spec, LOG_LEVEL="INFO") as live:
                result, timeline = await _slow_run(bench, live, round_no, config)
                report.steps.append(result)
                timelines.setdefault(live.name, timeline)
    rows = []
    for target, steps in rpt.by_target(report.steps).items():
        rows.append(
            [
                target,
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.p50 if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.p99 if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: s.latency_ms.max if s.latency_ms else None)),
                rpt.fmt(median_of(steps, lambda s: float(s.lost)), 0),
                rpt.fmt(median_of(steps, lambda s: float(s.expected)), 0),
                ", ".join(_stalled_outcome(s) for s in steps),
                rpt.fmt(median_of(steps, lambda s: s.extra["stalled_backlog_mib"]), 1),
                rpt.fmt(median_of(steps, lambda s: s.server_rss_mib), 0),
            ]
        )
    report.sections += [
        "Medians over rounds; the healthy members' latency and losses, and what became of the "
        "stalled one:",
        "",
        rpt.table(
            [
                "target",
                "others p50 ms",
                "others p99 ms",
                "others max ms",
                "lost",
                "expected",
                "stalled member (per round)",
                "MiB held for it at the end",
                "server RSS MiB",
            ],
            rows,
        ),
    ]
    chat = [s for s in report.steps if s.target == CHAT_SERVICE]
    if chat:
        p99 = median_of(chat, lambda s: s.latency_ms.p99 if s.latency_ms else None)
        closed = all(_closed_4408(s) for s in chat)
        met = closed and p99 is not None and p99 <= P99_TARGET_MS and all(s.lost == 0 for s in chat)
        report.summary["target_others_p99_le_50_and_4408"] = met
        report.sections += [
            f"Target: others' p99 ≤ 50 ms ({rpt.fmt(p99)} ms) and the stalled member closed "
            f"4408 ({'yes' if closed else 'no'}): {'met' if met else 'NOT met'}.",
            "",
        ]
    report.summary["timelines"] = timelines  # (second, p99 ms, frames) per target, round 1
    chart(
        report,
        bench,
        lambda path: rpt.timeline_chart(timelines, path, report.title),
    )
    return report


async def _slow_run(
    bench: Bench, live: Live, round_no: int, config: SlowConfig
) -> tuple[StepResult, list[tuple[float, float, int]]]:
    swarm, members, accounts = await room_swarm(
        bench, live, config.members, f"slow-{config.members}", extra_accounts=1
    )
    # Not in swarm.members: its deliveries are not expected, it only has to be dealt with.
    stalled = Member(swarm, accounts[config.members], members[0].room_id)
    try:
        await swarm.open(stalled, rcvbuf=config.rcvbuf)
        await swarm.join(stalled)
        assert stalled.client is not None
        stalled.client.on_text = _ignore_text
        stalled.client.stall()
        await swarm.settle()
        live.pin()
        async with bench.profiling(live, "slow-consumer"):
            result = await measure_step(
                swarm,
                members[: config.senders],
                target=live.name,
                round_no=round_no,
                label=f"{config.rate:g}/s",
                rate_per_s=config.rate,
                duration_s=config.duration_s,
                body_chars=config.body_chars,
                drain_s=config.drain_s,
                server=live.meter(),
                keep_arrivals=True,
                others=bench.infra_meters(),
            )
        before = stalled.client.bytes_received
        # Read what the server still holds for it: a 4408 close frame shows only if the
        # server could still write it; a server that gave up resets the connection (1006).
        stalled.client.resume()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(stalled.client.closed), 20)
        closed = stalled.client.closed
        logs = live.server.logs(tail=1_000_000) if live.server else ""
        result.extra.update(
            {
                # The close frame's code; 1006 if the stream ended without one; None: open.
                "stalled_close_code": closed.result() if closed.done() else None,
                "stalled_closed_4408_in_server_log": SLOW_CLOSE_LOG in logs,
                "stalled_backlog_mib": (stalled.client.bytes_received - before) / 2**20,
            }
        )
        return result, _timeline(swarm, config.duration_s)
    finally:
        if stalled.client is not None:
            stalled.client.abort()
        await swarm.close_all()


def _closed_4408(step: StepResult) -> bool:
    return bool(
        step.extra["stalled_close_code"] == 4408 or step.extra["stalled_closed_4408_in_server_log"]
    )


def _stalled_outcome(step: StepResult) -> str:
    code = step.extra["stalled_close_code"]
    if _closed_4408(step):
        return "closed 4408" + ("" if code == 4408 else f" (client saw {code})")
    return "still open" if code is None else f"closed {code}"


def _ignore_text(_client: Any, _payload: bytes) -> None:
    return None


def _timeline(swarm: Swarm, duration_s: float) -> list[tuple[float, float, int]]:
    """Per second of the step: p99 latency (ms) of the frames received, and how many (a
    room that froze shows as seconds with none)."""
    recorder = swarm.recorder
    buckets: dict[int, list[int]] = {}
    for arrival, latency in zip(recorder.arrivals, recorder.latencies, strict=True):
        buckets.setdefault(int(arrival // 1_000_000_000), []).append(latency)
    last = max(max(buckets, default=-1), math.ceil(duration_s) - 1)
    points = []
    for second in range(last + 1):
        stats = Percentiles.of_ns(buckets.get(second, []))
        points.append(
            (float(second), stats.p99 if stats else float("nan"), len(buckets.get(second, [])))
        )
    return points
