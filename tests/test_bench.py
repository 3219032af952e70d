"""Smoke run of the benchmark suite (`chat-service bench`): it works end to end.

One tiny fan-out, run the way an operator runs it: the bench creates and migrates its own
Postgres database, starts chat-service and both baselines (bench/baselines/), drives each
with real WebSocket clients, writes JSON, markdown and a chart, and drops its database. It
checks that every message was delivered and acked at a trivial rate; it checks no speed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chat_service.bench.command import _options, build_parser
from chat_service.bench.runner import Bench
from chat_service.bench.scenarios.sweeps import _best_ingest
from chat_service.bench.stats import Percentiles, StepResult
from tests.conftest import DEFAULT_SERVER_URL

pytestmark = pytest.mark.backend_independent(suite="postgres")  # see tests/conftest.py

MEMBERS = 3
RATES = (10.0, 20.0)
DURATION_S = 0.5
TARGETS = ("chat-service", "tutorial", "raw")
SRC = Path(__file__).resolve().parents[1] / "src"
# What the copy of src/ given to --source does when imported, so the test sees it ran.
MARKER = "imported-from-the-copy"


def run_bench(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "chat_service", "bench", *args, "--out", str(out)]
    admin_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_SERVER_URL)
    return subprocess.run(
        [*command, "--admin-database-url", admin_url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def database_exists(name: str) -> bool:
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_SERVER_URL)
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        found = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await connection.close()
    return found is not None


@pytest.fixture(scope="module")
def fanout_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    result = run_bench(
        out,
        "fanout",
        "--members",
        str(MEMBERS),
        "--senders",
        "1",
        "--rates",
        ",".join(f"{rate:g}" for rate in RATES),
        "--duration",
        str(DURATION_S),
        "--rounds",
        "1",
        "--targets",
        ",".join(TARGETS),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / f"fanout-{MEMBERS}.json").read_text())
    return out, report, result.stderr


def test_every_target_delivers_every_message_at_a_trivial_rate(
    fanout_run: tuple[Path, dict[str, Any], str],
) -> None:
    _, report, _ = fanout_run
    steps = [step for step in report["steps"] if step["label"] != "warm-up"]
    assert {step["target"] for step in steps} == set(TARGETS)
    for step in steps:
        where = f"{step['target']} at {step['offered_per_s']}/s"
        assert step["sent"] == round(step["offered_per_s"] * DURATION_S), where
        # Every member, the sender included, gets every message exactly once.
        assert step["expected"] == step["sent"] * MEMBERS, where
        assert step["delivered"] == step["expected"], where
        assert step["lost"] == 0, where
        assert step["errors"] == {}, where
        assert step["latency_ms"]["count"] == step["delivered"], where
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["max"], where
        if step["target"] == "chat-service":
            assert step["acks"] == step["sent"], where  # every send stored and acked
            assert step["ack_latency_ms"]["count"] == step["sent"], where
        else:
            assert step["acks_per_s"] is None, where  # the baselines store nothing
        # The bench started the server, so /proc told it about the server's memory.
        assert step["server_rss_mib"] > 1, where


def test_results_are_written_as_json_markdown_and_a_chart(
    fanout_run: tuple[Path, dict[str, Any], str],
) -> None:
    out, report, _ = fanout_run
    assert report["machine"]["nproc"] >= 1
    assert report["summary"]["capacity"].keys() == set(TARGETS)
    markdown = (out / f"fanout-{MEMBERS}.md").read_text()
    assert "| target | offered msg/s | p50 ms |" in markdown
    for target in TARGETS:
        assert f"| {target} | 10 |" in markdown
    chart = out / report["charts"][0]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{chart.name}]({chart.name})" in markdown


async def test_the_bench_database_is_dropped_afterwards(
    fanout_run: tuple[Path, dict[str, Any], str],
) -> None:
    _, _, stderr = fanout_run
    created = re.findall(r"created the bench database (\S+)", stderr)
    assert len(created) == 1, stderr[-2000:]
    assert f"dropped the bench database {created[0]}" in stderr
    assert not await database_exists(created[0])


def test_the_database_is_analyzed_between_the_warm_up_and_the_measured_steps(
    fanout_run: tuple[Path, dict[str, Any], str],
) -> None:
    # Plans a server prepared against the empty tables of a new database would otherwise
    # stay until autovacuum came by, and slow whichever target runs first.
    _, _, stderr = fanout_run
    lines = stderr.splitlines()
    warm_up = next(i for i, line in enumerate(lines) if "chat-service round 1 warm-up" in line)
    analyzed = next(i for i, line in enumerate(lines) if "analyzed the bench database" in line)
    first = next(
        i for i, line in enumerate(lines) if f"chat-service round 1 {RATES[0]:g}/s" in line
    )
    assert warm_up < analyzed < first


# --- --source: chat-service from other sources, alternated with ours ------------------------


@pytest.fixture
def other_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of our src/ that leaves a marker next to its package when imported."""
    root = tmp_path_factory.mktemp("other")
    shutil.copytree(SRC, root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    init = root / "src" / "chat_service" / "__init__.py"
    init.write_text(
        init.read_text() + f"\n__import__('pathlib').Path(__file__).with_name({MARKER!r}).touch()\n"
    )
    return root


def test_each_source_adds_a_chat_service_target_after_those_chosen() -> None:
    args = build_parser().parse_args(
        ["fanout", "--targets", "chat-service,raw", "--source", f"before={SRC.parent}"]
    )
    specs = Bench(_options(args)).specs()
    assert [(spec.name, spec.kind, spec.source) for spec in specs] == [
        ("chat-service", "chat-service", None),
        ("raw", "raw", None),
        ("chat-service@before", "chat-service", SRC.parent),
    ]


# login-storm starts chat-service alone, so it runs once per round with each source: the
# path that differs most from the alternation of --targets (the same launch serves both).
def test_a_source_runs_alternated_with_ours_from_its_own_code(
    tmp_path: Path, other_source: Path
) -> None:
    marker = other_source / "src" / "chat_service" / MARKER
    result = run_bench(
        tmp_path,
        "login-storm",
        *("--members", "3", "--senders", "1", "--rate", "10", "--logins-per-s", "5"),
        *("--duration", "0.5", "--rounds", "1", "--targets", "chat-service"),
        *("--source", f"copy={other_source}"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert marker.exists(), "the server did not import the copy"
    package = other_source.resolve() / "src" / "chat_service"
    assert f"chat-service@copy runs chat_service from {package}" in result.stderr
    assert f"chat-service runs chat_service from {SRC / 'chat_service'}" in result.stderr
    report = json.loads((tmp_path / "login-storm.json").read_text())
    steps = [step for step in report["steps"] if step["label"] != "warm-up"]
    assert {step["target"] for step in steps} == {"chat-service", "chat-service@copy"}
    for step in steps:
        where = f"{step['target']} {step['label']}"
        assert step["delivered"] == step["expected"] > 0, where
        assert step["acks"] == step["sent"], where
        if step["label"] == "storm":
            assert step["extra"]["logins_ok"] == step["extra"]["logins_offered"] > 0, where
    markdown = (tmp_path / "login-storm.md").read_text()
    assert "| chat-service@copy | storm | 1 |" in markdown


def _ingest_step(offered: float, acked_share: float, ack_p99_ms: float) -> StepResult:
    sent = int(offered * 5)
    acks = int(sent * acked_share)
    return StepResult(
        target="chat-service",
        round=1,
        label=f"{offered:.0f}/s",
        offered_per_s=offered,
        duration_s=5.0,
        sent=sent,
        expected=sent * 5,
        delivered=sent * 5,
        lost=0,
        late=0,
        acks=acks,
        delivered_per_s=sent * 5 / 5.01,
        acks_per_s=acks / 5.01,  # the window runs to the last delivery: a little over 5 s
        latency_ms=None,
        ack_latency_ms=Percentiles(count=acks, p50=1.0, p90=2.0, p99=ack_p99_ms, max=ack_p99_ms),
    )


def test_ingest_is_judged_by_the_highest_rate_whose_every_send_was_acked_in_time() -> None:
    steps = [
        _ingest_step(4000, 1.0, 10.0),
        _ingest_step(5000, 1.0, 30.0),  # every send acked: 4,990 acks/s over its window
        _ingest_step(5500, 0.999, 30.0),  # one in a thousand never acked
        _ingest_step(6000, 1.0, 80.0),  # acked, but too slowly
    ]
    best = _best_ingest(steps)
    assert best is not None
    assert best.offered_per_s == 5000
    assert best.acks_per_s is not None
    assert best.acks_per_s < 5000
    assert _best_ingest(steps[2:]) is None
