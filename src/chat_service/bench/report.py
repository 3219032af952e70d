"""Results on disk: JSON (everything), a markdown summary, and PNG charts."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from chat_service.bench import profile
from chat_service.bench.proc import loadavg, machine
from chat_service.bench.stats import StepResult, highest_held, median, ratio

log = logging.getLogger(__name__)


@dataclass
class ScenarioReport:
    scenario: str
    title: str
    config: dict[str, Any]
    command: list[str]
    steps: list[StepResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)  # markdown, in order
    charts: list[str] = field(default_factory=list)  # file names in the output directory
    machine: dict[str, Any] = field(default_factory=machine)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "title": self.title,
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {**self.machine, "loadavg_at_end": loadavg()},
            "config": self.config,
            "summary": self.summary,
            "steps": [step.to_json() for step in self.steps],
            "charts": self.charts,
        }

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"## {self.title}",
            "",
            f"`{' '.join(self.command)}`",
            "",
            f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
            f"Python {m['python']}; load average {m['loadavg_at_start']} at the start, "
            f"{loadavg()} at the end; {self.started_at}. Code: {_source(m)}.",
            "",
            *self.sections,
        ]
        lines += [f"![{name}]({name})" for name in self.charts]
        return "\n".join(lines).rstrip() + "\n"


def _source(machine_info: dict[str, Any]) -> str:
    source = machine_info.get("source", {})
    changes = source.get("src_changes", [])
    commit = source.get("commit", "unknown commit")
    return f"{commit}" + (f" + {len(changes)} changed files under src/" if changes else "")


def write(report: ScenarioReport, out: Path) -> tuple[Path, Path]:
    json_path = out / f"{report.scenario}.json"
    md_path = out / f"{report.scenario}.md"
    json_path.write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
    md_path.write_text(report.markdown())
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path


def add_profiles(report: ScenarioReport, profiles: list[tuple[str, str, profile.Profile]]) -> None:
    """Where the server's CPU went, for this scenario's runs recorded with --profile."""
    for scenario, title, summary in profiles:
        if scenario != report.scenario:
            continue
        report.sections.append(profile.markdown(summary, title))
        report.summary.setdefault("profiles", []).append(
            {
                "title": title,
                "file": summary.path.name,
                "samples": summary.samples,
                "by_activity": summary.by_activity,
                "self_by_package": summary.self_by_package,
                "inclusive": summary.inclusive,
            }
        )


# --- markdown ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def by_target(steps: Iterable[StepResult]) -> dict[str, list[StepResult]]:
    grouped: dict[str, list[StepResult]] = defaultdict(list)
    for step in steps:
        grouped[step.target].append(step)
    return dict(grouped)


def _median_of(
    steps: Sequence[StepResult], get: Callable[[StepResult], float | None]
) -> float | None:
    return median(get(step) for step in steps)


def _infra_cpu(step: StepResult) -> float | None:
    """CPU of the private Postgres and Redis the bench started, if any."""
    used = [v for k, v in step.extra.items() if k.endswith("_cpu") and isinstance(v, float)]
    return sum(used) if used else None


def _cpu_per_frame(step: StepResult) -> float | None:
    """Server CPU time per delivered frame, µs: the cost of the work, whatever share of a
    core the server got on a busy machine."""
    if step.server_cpu is None or not step.delivered_per_s:
        return None
    return step.server_cpu / step.delivered_per_s * 1e6


def sweep_rows(steps: Sequence[StepResult]) -> list[dict[str, Any]]:
    """Medians across rounds for each target and offered load."""
    grouped: dict[tuple[str, float], list[StepResult]] = defaultdict(list)
    for step in steps:
        grouped[(step.target, step.offered_per_s)].append(step)
    rows: list[dict[str, Any]] = []
    for (target, offered), group in grouped.items():
        rows.append(
            {
                "target": target,
                "offered_per_s": offered,
                "runs": len(group),
                "held_runs": sum(step.held for step in group),
                "p50_ms": _median_of(group, lambda s: s.latency_ms.p50 if s.latency_ms else None),
                "p90_ms": _median_of(group, lambda s: s.latency_ms.p90 if s.latency_ms else None),
                "p99_ms": _median_of(group, lambda s: s.latency_ms.p99 if s.latency_ms else None),
                "max_ms": _median_of(group, lambda s: s.latency_ms.max if s.latency_ms else None),
                "ack_p99_ms": _median_of(
                    group, lambda s: s.ack_latency_ms.p99 if s.ack_latency_ms else None
                ),
                "delivered_per_s": _median_of(group, lambda s: s.delivered_per_s),
                "acks_per_s": _median_of(group, lambda s: s.acks_per_s),
                "lost": _median_of(group, lambda s: s.lost),
                "errors": sum(sum(step.errors.values()) for step in group),
                "server_cpu": _median_of(group, lambda s: s.server_cpu),
                "cpu_us_per_frame": _median_of(group, _cpu_per_frame),
                "infra_cpu": _median_of(group, _infra_cpu),
                "server_rss_mib": _median_of(group, lambda s: s.server_rss_mib),
                "generator_cpu": _median_of(group, lambda s: s.generator_cpu),
            }
        )
    order = {target: i for i, target in enumerate(dict.fromkeys(s.target for s in steps))}
    rows.sort(key=lambda row: (order[row["target"]], row["offered_per_s"]))
    return rows


def sweep_table(rows: Sequence[dict[str, Any]], unit: str = "msg/s") -> str:
    header = [
        "target",
        f"offered {unit}",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "ack p99 ms",
        "delivered frames/s",
        "acks/s",
        "lost",
        "errors",
        "server CPU",
        "CPU µs/frame",
        "Postgres+Redis CPU",
        "server RSS MiB",
        "generator CPU",
        "held",
    ]
    return table(
        header,
        (
            [
                row["target"],
                fmt(row["offered_per_s"], 0),
                fmt(row["p50_ms"]),
                fmt(row["p90_ms"]),
                fmt(row["p99_ms"]),
                fmt(row["max_ms"]),
                fmt(row["ack_p99_ms"]),
                fmt(row["delivered_per_s"], 0),
                fmt(row["acks_per_s"], 0),
                fmt(row["lost"], 0),
                str(row["errors"]),
                fmt(row["server_cpu"], 2),
                fmt(row["cpu_us_per_frame"], 0),
                fmt(row["infra_cpu"], 2),
                fmt(row["server_rss_mib"], 0),
                fmt(row["generator_cpu"], 2),
                f"{row['held_runs']}/{row['runs']}",
            ]
            for row in rows
        ),
    )


def capacity(steps: Sequence[StepResult], reference: str | None) -> dict[str, Any]:
    """Per target: the highest offered load held in each round, its median, and the ratio of
    each target's median to the reference target's (chat-service)."""
    targets = by_target(steps)
    result: dict[str, Any] = {}
    for target, target_steps in targets.items():
        rounds: dict[int, list[StepResult]] = defaultdict(list)
        for step in target_steps:
            rounds[step.round].append(step)
        per_round = [highest_held(rounds[r]) for r in sorted(rounds)]
        delivered = [max(s.delivered_per_s for s in rounds[r]) for r in sorted(rounds)]
        result[target] = {
            "highest_held_per_round": per_round,
            "highest_held_median": median(v if v is not None else 0.0 for v in per_round),
            "max_delivered_per_s_median": median(delivered),
            # Steps without loss only: a collapsed server's CPU goes into its backlog too.
            "cpu_us_per_frame": median(_cpu_per_frame(s) for s in target_steps if s.lost == 0),
        }
    if reference in result:
        mine = result[reference]["highest_held_median"]
        for entry in result.values():
            entry["reference_vs_this"] = ratio(mine, entry["highest_held_median"])
    return result


def capacity_table(cap: dict[str, Any], reference: str | None, unit: str = "msg/s") -> str:
    header = [
        "target",
        f"highest held {unit} (per round)",
        "median",
        "max delivered frames/s (median)",
        "server CPU µs per frame",
    ]
    if reference:
        header.append(f"{reference} ÷ this")
    rows = []
    for target, entry in cap.items():
        row = [
            target,
            ", ".join(fmt(v, 0) for v in entry["highest_held_per_round"]),
            fmt(entry["highest_held_median"], 0),
            fmt(entry["max_delivered_per_s_median"], 0),
            fmt(entry["cpu_us_per_frame"], 0),
        ]
        if reference:
            row.append(fmt(entry.get("reference_vs_this"), 2))
        rows.append(row)
    return table(header, rows)


# --- charts --------------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib, headless; imported only when a chart is drawn (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_chart(
    rows: Sequence[dict[str, Any]], path: Path, title: str, unit: str = "msg/s"
) -> None:
    """p50 and p99 latency, and delivered frames/s, against offered load, per target."""
    plt = _pyplot()
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    targets = list(dict.fromkeys(row["target"] for row in rows))
    for index, target in enumerate(targets):
        mine = [row for row in rows if row["target"] == target and row["p99_ms"] is not None]
        if not mine:
            continue
        x = [row["offered_per_s"] for row in mine]
        color = f"C{index}"
        latency.plot(x, [r["p99_ms"] for r in mine], "o-", color=color, label=f"{target} p99")
        latency.plot(x, [r["p50_ms"] for r in mine], ".:", color=color, label=f"{target} p50")
        throughput.plot(x, [r["delivered_per_s"] for r in mine], "o-", color=color, label=target)
    latency.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    latency.set_yscale("log")
    latency.set_xlabel(f"offered {unit}")
    latency.set_ylabel("send → receive latency, ms")
    latency.legend(fontsize=6)
    throughput.set_xlabel(f"offered {unit}")
    throughput.set_ylabel("delivered frames/s")
    throughput.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def timeline_chart(
    series: dict[str, list[tuple[float, float, int]]], path: Path, title: str
) -> None:
    """Per target and second of the run: the healthy members' p99, and their deliveries."""
    plt = _pyplot()
    fig, (latency, delivered) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    for index, (target, points) in enumerate(series.items()):
        if not points:
            continue
        seconds = [p[0] for p in points]
        color = f"C{index}"
        latency.plot(seconds, [p[1] for p in points], "o-", markersize=3, color=color, label=target)
        delivered.plot(seconds, [p[2] for p in points], "-", color=color, label=target)
    latency.axhline(50, color="grey", linewidth=0.8, linestyle="--")
    latency.set_yscale("log")
    latency.set_xlabel("seconds into the run")
    latency.set_ylabel("others' p99 in that second, ms")
    latency.legend(fontsize=7)
    delivered.set_xlabel("seconds into the run")
    delivered.set_ylabel("frames delivered in that second")
    delivered.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bar_chart(values: dict[str, float], path: Path, title: str, ylabel: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(figsize=(5, 3), dpi=80)
    names = list(values)
    axes.bar(names, [values[name] for name in names], color=[f"C{i}" for i in range(len(names))])
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
