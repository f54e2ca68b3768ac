"""The router's Faust tables for unit tests: made as the router makes them (its app's
store, workers/stream/table_store.py), owning the changelog partitions a test
gives them, with the changelog records they send recorded instead of produced."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from faust.types import TableT

from workers.config import Settings
from workers.stream.app import make_app
from workers.stream.router import raw_table
from workers.stream.table_store import Store

APP_ID = "tables-test"


def changelog(name: str) -> str:
    """The changelog topic of the router table `name` (Faust names it by app and table)."""
    return f"{APP_ID}-{name}-changelog"


@dataclass
class RouterTable:
    """A router table and the changelog records (partition, key, value) it sent."""

    table: TableT
    sent: list[tuple[int | None, bytes, bytes | None]] = field(default_factory=list)

    @property
    def data(self) -> Any:
        return self.table.data


def router_table(name: str, owned: Iterable[int] = range(4)) -> RouterTable:
    """The router's table `name`, owning changelog partitions `owned` (as after a
    rebalance that assigned them)."""
    settings = Settings()
    table = raw_table(make_app(APP_ID, settings, "127.0.0.1:9"), name, settings, name)
    recorded = RouterTable(table)

    def send_changelog(partition: int | None, key: bytes, value: bytes | None) -> None:
        recorded.sent.append((partition, key, value))

    table.send_changelog = send_changelog  # type: ignore[assignment]
    store = table.data
    assert isinstance(store, Store)
    store.own(owned)
    return recorded
