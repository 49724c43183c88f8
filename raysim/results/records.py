"""A run's records as Arrow tables: metric rows (round, metric, value), failure records
(round, kind, client, actor, attempt, reason) and personalised evaluation's per-client rows
(round, client, metric, value). The run directory and checkpoints store the same tables; a
resumed run rebuilds its round results from them."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raysim.types import RoundResult

FAILURE_SCHEMA = pa.schema([("round", pa.int32()), ("kind", pa.string()),
                            ("client", pa.int64()), ("actor", pa.string()),
                            ("attempt", pa.int32()), ("reason", pa.string())])
CLIENT_METRICS_SCHEMA = pa.schema([("round", pa.int32()), ("client", pa.int64()),
                                   ("metric", pa.string()), ("value", pa.float64())])


def metrics_table(results: Iterable[RoundResult]) -> pa.Table:
    rounds, names, values = [], [], []
    for result in results:
        for name, value in result.metrics.items():
            rounds.append(result.round)
            names.append(name)
            values.append(float(value))
    return pa.table({"round": pa.array(rounds, pa.int32()), "metric": pa.array(names, pa.string()),
                     "value": pa.array(values, pa.float64())})


def client_metrics_table(results: Iterable[RoundResult]) -> pa.Table:
    """The per-client rows of `results` (`RoundResult.client_metrics`), in their order."""
    rows = [(result.round, client, name, float(value)) for result in results
            for client, name, value in result.client_metrics]
    columns = list(zip(*rows)) if rows else [(), (), (), ()]
    return pa.Table.from_arrays([pa.array(column, field.type) for column, field
                                 in zip(columns, CLIENT_METRICS_SCHEMA)],
                                schema=CLIENT_METRICS_SCHEMA)


def failures_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in records], schema=FAILURE_SCHEMA)


def to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def from_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def results_from_tables(metrics: pa.Table, failures: pa.Table,
                        client_metrics: pa.Table | None = None) -> list[RoundResult]:
    """The round results a checkpoint recorded (failure records and per-client rows attached
    to their rounds)."""
    by_round: dict[int, dict[str, float]] = defaultdict(dict)
    for r, name, value in zip(*(metrics.column(c).to_pylist()
                                for c in ("round", "metric", "value"))):
        by_round[r][name] = value
    events: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in failures.to_pylist():
        events[record["round"]].append(record)
    clients: dict[int, list[tuple[int, str, float]]] = defaultdict(list)
    if client_metrics is not None:
        for r, client, name, value in zip(*(client_metrics.column(c).to_pylist()
                                            for c in CLIENT_METRICS_SCHEMA.names)):
            clients[r].append((client, name, value))
    return [RoundResult(
        round=r, metrics=m, seconds=m.get("round_seconds", 0.0), events=tuple(events[r]),
        failures={e["client"]: e["reason"] for e in events[r] if e["kind"] == "client_dropped"},
        client_metrics=tuple(clients[r]))
        for r, m in sorted(by_round.items())]
