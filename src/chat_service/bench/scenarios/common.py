"""What the scenarios share: their settings, a room full of connected members, and the
rate sweep with its report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from chat_service.bench import report as rpt
from chat_service.bench.accounts import Account
from chat_service.bench.load import Member, Swarm, measure_step
from chat_service.bench.report import ScenarioReport
from chat_service.bench.runner import Bench, Live
from chat_service.bench.servers import CHAT_SERVICE
from chat_service.bench.stats import P99_TARGET_MS, StepResult, median

# A step this bad ends a sweep: the server is saturated and its backlog would spoil the next.
COLLAPSE_P99_MS = 1000.0
COLLAPSE_LOSS = 0.05
TUTORIAL, RAW = "tutorial", "raw"
# What chat-service logs (INFO) when it closes a connection 4408 (realtime/connection.py).
SLOW_CLOSE_LOG = "closing a slow connection: outbound queue full"


@dataclass(frozen=True)
class SweepConfig:
    rates: tuple[float, ...]
    duration_s: float = 5.0
    body_chars: int = 64
    drain_s: float = 3.0
    full_sweep: bool = False


@dataclass(frozen=True)
class FanoutConfig:
    members: int = 100
    senders: int = 5
    sweep: SweepConfig = SweepConfig(rates=(10, 20, 50, 100, 150, 200, 300, 500, 800))


@dataclass(frozen=True)
class IngestConfig:
    rooms: int = 200
    members: int = 5
    sweep: SweepConfig = SweepConfig(rates=(100, 250, 500, 1000, 2000, 3500, 5000))


@dataclass(frozen=True)
class ConnectionsConfig:
    connections: int = 10_000
    per_user: int = 10
    concurrency: int = 100
    hold_s: float = 5.0


@dataclass(frozen=True)
class HistoryConfig:
    messages: int = 1_000_000
    small_messages: int = 1_000
    requests: int = 200


@dataclass(frozen=True)
class StormConfig:
    members: int = 100
    senders: int = 5
    rate: float = 20.0
    logins_per_s: float = 20.0
    duration_s: float = 15.0
    body_chars: int = 64
    drain_s: float = 3.0


@dataclass(frozen=True)
class SlowConfig:
    members: int = 100
    senders: int = 5
    rate: float = 25.0
    duration_s: float = 60.0
    body_chars: int = 4000
    rcvbuf: int = 4096
    drain_s: float = 3.0


@dataclass(frozen=True)
class WorkersConfig:
    workers: tuple[int, ...] = (1, 2, 4)
    load: FanoutConfig | IngestConfig = FanoutConfig()
    redis_url: str | None = None


# --- shared pieces -------------------------------------------------------------------------


def collapsed(step: StepResult) -> bool:
    return (
        step.latency_ms is None
        or step.latency_ms.p99 > COLLAPSE_P99_MS
        or step.lost > COLLAPSE_LOSS * max(1, step.expected)
    )


async def room_swarm(
    bench: Bench, live: Live, members: int, room_name: str, extra_accounts: int = 0
) -> tuple[Swarm, list[Member], list[Account]]:
    """`members` clients connected and joined to one room (plus spare accounts)."""
    population = bench.population(live)
    accounts = await population.ensure_accounts(members + extra_accounts)
    room_id = await population.ensure_room(room_name, accounts[0])
    swarm = Swarm(live.host, live.port, live.protocol)
    group = [swarm.add(account, room_id) for account in accounts[:members]]
    await swarm.open_all(group, join=True)
    await swarm.settle()
    return swarm, group, accounts


async def sweep(
    bench: Bench,
    swarm: Swarm,
    senders: Sequence[Member],
    live: Live,
    round_no: int,
    config: SweepConfig,
) -> list[StepResult]:
    """A warm-up, then each rate in turn until the target collapses."""
    meter = live.meter()
    others = bench.infra_meters()

    async def step(rate: float, label: str, duration_s: float) -> StepResult:
        result = await measure_step(
            swarm,
            senders,
            target=live.name,
            round_no=round_no,
            label=label,
            rate_per_s=rate,
            duration_s=duration_s,
            body_chars=config.body_chars,
            drain_s=config.drain_s,
            server=meter,
            others=others,
        )
        await swarm.settle(0.3, 10)
        return result

    await step(config.rates[0], "warm-up", min(1.0, config.duration_s))
    await bench.refresh_statistics()  # now that the warm-up has stored messages
    results: list[StepResult] = []
    for rate in config.rates:
        result = await step(rate, f"{rate:g}/s", config.duration_s)
        results.append(result)
        # On a shared machine steps miss the p99 target for reasons of their own: only a
        # collapse (seconds of latency, or loss) ends the sweep.
        if not config.full_sweep and collapsed(result):
            break
    return results


def sweep_report(report: ScenarioReport, unit: str, reference: str | None = CHAT_SERVICE) -> None:
    """Medians per target and rate, and each target's capacity, into the report."""
    rows = rpt.sweep_rows(report.steps)
    cap = rpt.capacity(report.steps, reference)
    report.summary["medians"] = rows
    report.summary["capacity"] = cap
    report.sections += [
        f"Medians over rounds (a rate is *held* with p99 ≤ {P99_TARGET_MS:g} ms, no loss, no "
        "error):",
        "",
        rpt.sweep_table(rows, unit),
        rpt.capacity_table(cap, reference if reference in cap else None, unit),
    ]


def chart(report: ScenarioReport, bench: Bench, draw: Callable[[Path], None]) -> None:
    """Draw the scenario's chart into the output directory and list it in the report."""
    name = f"{report.scenario}.png"
    draw(bench.options.out / name)
    report.charts.append(name)


def median_of(
    steps: Sequence[StepResult], get: Callable[[StepResult], float | None]
) -> float | None:
    return median(get(step) for step in steps)
