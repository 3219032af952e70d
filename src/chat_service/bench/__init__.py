"""The benchmark suite (`chat-service bench`): a load generator and the scenarios of issue 7.

Needs the `bench` extra (matplotlib, for the charts). Imported only by that subcommand.
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from chat_service.bench.command import main as run

    return run(argv)
