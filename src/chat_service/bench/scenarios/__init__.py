"""The scenarios of issue 7: fan-out, ingest, connections, history, login storm, slow
consumer, and fan-out across workers. Each alternates its targets round by round (A B A B)
and returns a report with the raw steps, medians and ratios."""

from chat_service.bench.scenarios.common import (
    ConnectionsConfig,
    FanoutConfig,
    HistoryConfig,
    IngestConfig,
    SlowConfig,
    StormConfig,
    SweepConfig,
    WorkersConfig,
)
from chat_service.bench.scenarios.connections import connections
from chat_service.bench.scenarios.history import history
from chat_service.bench.scenarios.slow import slow_consumer
from chat_service.bench.scenarios.storm import login_storm
from chat_service.bench.scenarios.sweeps import fanout, ingest, workers

__all__ = [
    "ConnectionsConfig",
    "FanoutConfig",
    "HistoryConfig",
    "IngestConfig",
    "SlowConfig",
    "StormConfig",
    "SweepConfig",
    "WorkersConfig",
    "connections",
    "fanout",
    "history",
    "ingest",
    "login_storm",
    "slow_consumer",
    "workers",
]
