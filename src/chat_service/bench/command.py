"""`chat-service bench SCENARIO [options]`: the command line of the benchmark suite."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chat_service.bench import report as rpt
from chat_service.bench import scenarios as sc
from chat_service.bench.report import ScenarioReport, add_profiles, write
from chat_service.bench.runner import DEFAULT_ADMIN_DATABASE_URL, Bench, Options
from chat_service.bench.servers import (
    CHAT_SERVICE,
    DEFAULT_BASELINES,
    SOURCE_SEPARATOR,
    TARGET_KINDS,
)
from chat_service.bench.stats import StepResult, median

log = logging.getLogger("chat_service.bench")

EPILOG = """
Without --url the bench starts every target itself, alternating them round by round
(A B C A B C): chat-service on a fresh Postgres database it creates and migrates (dropped at
the end), with the limits a load test needs raised (signups, logins, messages per user), and
the baselines from bench/baselines/. The server runs on CPU 0, the generator on CPU 1.

--source LABEL=DIR adds the target chat-service@LABEL: chat-service run from DIR/src (with
PYTHONPATH, in this venv) on the same database and population, alternated with the others.
history, login-storm and workers, which start chat-service alone, then run once per round
with each chat-service in turn.

With --url it drives that running instance instead; its operator must raise the same limits:
SIGNUP_IP_LIMIT=1000000/hour LOGIN_IP_LIMIT=1000000/minute LOGIN_ACCOUNT_LIMIT=1000000/minute
MESSAGE_RATE_PER_S=1000000 MESSAGE_BURST=1000000 (and MAX_CONNECTIONS_PER_USER >= --per-user
for `connections`). Give --server-pid for CPU and RSS when it runs on this machine.
"""


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _env(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name, value


def _source(text: str) -> tuple[str, Path]:
    label, sep, directory = text.partition("=")
    if not sep or not label or any(c in label for c in f"{SOURCE_SEPARATOR},/ "):
        raise argparse.ArgumentTypeError("expected LABEL=DIR, LABEL without @ , / or spaces")
    root = Path(directory).expanduser().resolve()
    if not (root / "src" / "chat_service" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"no chat_service package under {root}/src")
    return label, root


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("targets and output")
    group.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    group.add_argument("--rounds", type=int, default=2, help="runs of each target, alternated")
    group.add_argument(
        "--targets",
        default=",".join(TARGET_KINDS),
        help=f"targets the bench starts, alternated (of {', '.join(TARGET_KINDS)})",
    )
    group.add_argument(
        "--source",
        type=_source,
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also run chat-service from DIR/src, as target chat-service@LABEL (repeatable)",
    )
    group.add_argument("--url", help="drive this running instance instead (http://host:port)")
    group.add_argument(
        "--protocol",
        choices=("chat", "baseline"),
        default="chat",
        help="what --url speaks: chat-service, or a baseline (no accounts)",
    )
    group.add_argument("--server-pid", type=int, help="pid of the --url server, for /proc")
    group.add_argument("--database-url", help="the --url server's database (history scenario)")
    group.add_argument(
        "--admin-database-url",
        default=DEFAULT_ADMIN_DATABASE_URL,
        help="Postgres server where the bench creates its database",
    )
    group.add_argument("--keep-database", action="store_true", help="do not drop it at the end")
    group.add_argument(
        "--private-postgres",
        action="store_true",
        help="run a throwaway Postgres cluster for the bench instead of --admin-database-url",
    )
    group.add_argument("--baselines", type=Path, default=DEFAULT_BASELINES)
    group.add_argument(
        "--server-env",
        type=_env,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the servers the bench starts (repeatable)",
    )
    group.add_argument("--no-pin", action="store_true", help="do not pin server and generator")
    group.add_argument("--server-cpu", type=int, default=0)
    group.add_argument("--generator-cpu", type=int, default=1)
    group.add_argument(
        "--profile", action="store_true", help="sample chat-service with py-spy while measured"
    )
    group.add_argument(
        "--py-spy", default="py-spy", help='how to run py-spy, e.g. "uvx py-spy" (not a dependency)'
    )
    group.add_argument("-v", "--verbose", action="store_true")
    return common


def _sweep_options(parser: argparse.ArgumentParser, rates: str, duration: float) -> None:
    parser.add_argument("--rates", type=_floats, default=_floats(rates), help="msg/s, comma list")
    parser.add_argument("--duration", type=float, default=duration, help="seconds per rate")
    parser.add_argument("--body-chars", type=int, default=64)
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait for stragglers")
    parser.add_argument("--full-sweep", action="store_true", help="do not stop at a collapsed rate")


def _sweep(args: argparse.Namespace) -> sc.SweepConfig:
    return sc.SweepConfig(
        rates=args.rates,
        duration_s=args.duration,
        body_chars=args.body_chars,
        drain_s=args.drain,
        full_sweep=args.full_sweep,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chat-service bench",
        description="Load generator and benchmark scenarios for chat-service (issue 7).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    common = _common()

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return scenarios.add_parser(name, help=help_text, parents=[common], description=help_text)

    fanout = add("fanout", "(a) one room of N members, S senders, a rate sweep")
    fanout.add_argument("--members", type=_ints, default=(100, 1000), help="room sizes, comma list")
    fanout.add_argument("--senders", type=int, default=5)
    _sweep_options(fanout, "10,20,50,100,150,200,300,500,800", 5.0)

    ingest = add("ingest", "(b) many small rooms, everyone sending; rates are totals")
    ingest.add_argument("--rooms", type=int, default=200)
    ingest.add_argument("--members", type=int, default=5)
    _sweep_options(ingest, "100,250,500,1000,2000,3500,5000", 5.0)

    conns = add("connections", "(c) N idle authenticated sockets: RSS each, handshakes/s")
    conns.add_argument("--connections", type=int, default=10_000)
    conns.add_argument("--per-user", type=int, default=10, help="sockets per account")
    conns.add_argument("--concurrency", type=int, default=100, help="handshakes in flight")
    conns.add_argument("--hold", type=float, default=5.0, help="seconds idle before RSS")

    hist = add("history", "(d) join with history in a room of 1,000,000 stored messages")
    hist.add_argument("--messages", type=int, default=1_000_000)
    hist.add_argument("--small-messages", type=int, default=1_000)
    hist.add_argument("--requests", type=int, default=200, help="calls of each kind")

    storm = add("login-storm", "(e) logins/s during a fan-out, against the same without")
    storm.add_argument("--members", type=int, default=100)
    storm.add_argument("--senders", type=int, default=5)
    storm.add_argument("--rate", type=float, default=20.0, help="fan-out msg/s")
    storm.add_argument("--logins-per-s", type=float, default=20.0)
    storm.add_argument("--duration", type=float, default=15.0)

    slow = add("slow-consumer", "(f) one member of a fan-out stops reading at the socket")
    slow.add_argument("--members", type=int, default=100)
    slow.add_argument("--senders", type=int, default=5)
    slow.add_argument("--rate", type=float, default=25.0, help="msg/s (x body: > 5 MB total)")
    slow.add_argument("--duration", type=float, default=60.0)
    slow.add_argument("--body-chars", type=int, default=4000)
    slow.add_argument("--rcvbuf", type=int, default=4096, help="stalled socket's SO_RCVBUF")

    workers = add("workers", "fan-out or ingest with serve --workers N on Redis (unpinned)")
    workers.add_argument("--workers", type=_ints, default=(1, 2, 4))
    workers.add_argument(
        "--load", choices=("fanout", "ingest"), default="fanout", help="the scenario to run"
    )
    workers.add_argument("--members", type=int, help="per room (default: fanout 100, ingest 5)")
    workers.add_argument("--senders", type=int, default=5, help="fanout: senders")
    workers.add_argument("--rooms", type=int, default=200, help="ingest: rooms")
    workers.add_argument("--redis-url", help="default: a private redis-server on a free port")
    _sweep_options(workers, "10,20,50,100,200,300,500", 5.0)
    return parser


Scenario = Callable[[Bench], Coroutine[Any, Any, list[ScenarioReport]]]


# The scenarios that pick their chat-service targets themselves rather than --targets.
OWN_TARGETS = ("history", "login-storm", "workers")


def _scenario(args: argparse.Namespace, command: list[str]) -> Scenario:
    scenario = _scenario_of(args, command)
    if args.source and args.scenario in OWN_TARGETS:
        return _by_source(scenario)
    return scenario


def _scenario_of(args: argparse.Namespace, command: list[str]) -> Scenario:
    kind = args.scenario
    if kind == "fanout":

        async def run_fanout(bench: Bench) -> list[ScenarioReport]:
            return [
                await sc.fanout(bench, sc.FanoutConfig(n, args.senders, _sweep(args)), command)
                for n in args.members
            ]

        return run_fanout
    if kind == "workers":
        if args.load == "ingest":
            load: Any = sc.IngestConfig(args.rooms, args.members or 5, _sweep(args))
        else:
            load = sc.FanoutConfig(args.members or 100, args.senders, _sweep(args))
        config: Any = sc.WorkersConfig(args.workers, load, args.redis_url)
        return lambda bench: _one(sc.workers(bench, config, command))
    if kind == "ingest":
        config = sc.IngestConfig(args.rooms, args.members, _sweep(args))
        return lambda bench: _one(sc.ingest(bench, config, command))
    if kind == "connections":
        config = sc.ConnectionsConfig(args.connections, args.per_user, args.concurrency, args.hold)
        return lambda bench: _one(sc.connections(bench, config, command))
    if kind == "history":
        config = sc.HistoryConfig(args.messages, args.small_messages, args.requests)
        return lambda bench: _one(sc.history(bench, config, command))
    if kind == "login-storm":
        config = sc.StormConfig(
            args.members, args.senders, args.rate, args.logins_per_s, args.duration
        )
        return lambda bench: _one(sc.login_storm(bench, config, command))
    config = sc.SlowConfig(
        args.members, args.senders, args.rate, args.duration, args.body_chars, args.rcvbuf
    )
    return lambda bench: _one(sc.slow_consumer(bench, config, command))


async def _one(report: Coroutine[Any, Any, ScenarioReport]) -> list[ScenarioReport]:
    return [await report]


@dataclass
class _SourceRun:
    round_no: int
    label: str | None  # None: our code
    report: ScenarioReport


def _by_source(scenario: Scenario) -> Scenario:
    """Each round, the scenario once with each chat-service (ours, then each --source): the
    alternation the other scenarios get from --targets."""

    async def run(bench: Bench) -> list[ScenarioReport]:
        runs: list[_SourceRun] = []
        for round_no in range(1, bench.options.rounds + 1):
            for label in bench.chat_service_variants():
                with bench.from_source(label):
                    [report] = await scenario(bench)
                runs.append(_SourceRun(round_no, label, report))
                _keep_charts(runs[-1], bench.options.out)
        return [_merged(runs)]

    return run


def _keep_charts(run: _SourceRun, out: Path) -> None:
    """Rename the run's charts before the next run draws over them."""
    renamed = []
    for name in run.report.charts:
        path = out / name
        new = path.with_stem(f"{path.stem}-{run.label or 'ours'}-{run.round_no}")
        path.replace(new)
        renamed.append(new.name)
    run.report.charts = renamed


def _merged(runs: list[_SourceRun]) -> ScenarioReport:
    first = runs[0].report
    merged = ScenarioReport(
        scenario=first.scenario,
        title=first.title,
        config=first.config,
        command=first.command,
        machine=first.machine,
        started_at=first.started_at,
    )
    merged.sections += [
        "Each round ran the scenario once with each chat-service in turn, each on a fresh "
        "server: ours, then each `--source`.",
        "",
    ]
    for run in runs:
        for step in run.report.steps:
            step.round = run.round_no if step.round else 0  # 0: login-storm's warm-up
        merged.steps += run.report.steps
        merged.charts += run.report.charts
        merged.summary.setdefault("runs", []).append(
            {"round": run.round_no, "source": run.label, "summary": run.report.summary}
        )
    if merged.steps:
        merged.sections += ["Medians over rounds:", "", _step_medians(merged.steps)]
    for run in runs:
        source = "our code" if run.label is None else f"--source {run.label}"
        merged.sections += [f"### Round {run.round_no}, {source}", "", *run.report.sections]
    return merged


def _step_medians(steps: list[StepResult]) -> str:
    """Per target and step: the medians of the latencies, losses, CPU and numeric extras."""
    groups: dict[tuple[str, str], list[StepResult]] = {}
    for step in steps:
        if step.label != "warm-up":
            groups.setdefault((step.target, step.label), []).append(step)
    extras = [
        key
        for key in dict.fromkeys(k for s in steps for k in s.extra)
        if all(_number(s.extra.get(key, 0)) for s in steps)
    ]
    percentiles = ("p50", "p99", "max")
    header = ["target", "step", "runs", *(f"{p} ms" for p in percentiles)]
    header += ["lost", "server CPU", *extras]
    rows = []
    for (target, label), group in groups.items():
        latency = [
            rpt.fmt(median(getattr(s.latency_ms, p) if s.latency_ms else None for s in group))
            for p in percentiles
        ]
        rows.append(
            [
                target,
                label,
                str(len(group)),
                *latency,
                rpt.fmt(median(s.lost for s in group), 0),
                rpt.fmt(median(s.server_cpu for s in group), 2),
                *(rpt.fmt(median(s.extra.get(key) for s in group), 1) for key in extras),
            ]
        )
    return rpt.table(header, rows)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _options(args: argparse.Namespace) -> Options:
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if not args.no_pin and not pin:
        log.warning("fewer than 2 CPUs: server and generator are not pinned")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = set(targets) - set(TARGET_KINDS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    sources = dict(args.source)
    if len(sources) < len(args.source):
        raise SystemExit("--source: each LABEL once")
    if sources and args.url:
        raise SystemExit("--source runs servers the bench starts: not with --url")
    targets += tuple(f"{CHAT_SERVICE}{SOURCE_SEPARATOR}{label}" for label in sources)
    return Options(
        out=args.out,
        rounds=args.rounds,
        targets=targets,
        url=args.url,
        protocol=args.protocol,
        server_pid=args.server_pid,
        admin_database_url=args.admin_database_url,
        database_url=args.database_url,
        server_cpus={args.server_cpu} if pin else None,
        generator_cpus={args.generator_cpu} if pin else None,
        keep_database=args.keep_database,
        baselines=args.baselines,
        server_env=dict(args.server_env),
        profile=args.profile,
        private_postgres=args.private_postgres,
        py_spy=args.py_spy,
        sources=sources,
    )


def _event_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when present (uvicorn[standard] brings it): the generator must outrun the server."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Quiet the HTTP client's per-request lines: thousands of signups would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    options = _options(args)
    command = ["chat-service", "bench", *argv]
    scenario = _scenario(args, command)

    async def run() -> list[ScenarioReport]:
        async with Bench(options) as bench:
            reports = await scenario(bench)
            for report in reports:
                add_profiles(report, bench.profiles)
            return reports

    with asyncio.Runner(loop_factory=_event_loop()) as runner:
        reports = runner.run(run())
    for report in reports:
        write(report, options.out)
        sys.stdout.write(report.markdown() + "\n")
    return 0
