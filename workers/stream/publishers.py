"""Two ways to publish a pool's window, one promise: a decision is stored before
anyone can act on its assignment, and a router that lost the pool's partition
publishes nothing its successor does not know of.

- `AcknowledgedPublisher` (brokers without transactions): each decision is
  acknowledged by the broker before any assignment is sent, and the window is
  published only while this router's consumer generation is current.
- `TransactionalPublisher` (KAFKA_TRANSACTIONS): the decision log's published
  markers, the assignments, the window report and the pool's ledger entry in
  one Kafka transaction of the partition's producer (fencing.py); a fenced
  router's window is aborted whole.
  Fenced with no rebalance begun (the broker aborted the transaction itself,
  after its timeout, say), the router stops with the batch unacknowledged
  rather than go on without a producer for the partition.

Either way the decision log ends with the assignments marked published, so a
replayed window skips them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer

from schemas import Assignment, WindowReport
from workers.stream.app import Topics
from workers.stream.codec import encode
from workers.stream.decision_log import DecisionLog
from workers.stream.fencing import Fenced, PartitionProducers
from workers.stream.pool_ledger import PoolAccount, PoolLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolWindow:
    """What one pool's window publishes. Its queries share one partition of
    omnirouter.predicted, which is also the partition of the tables' changelogs."""

    pool: str
    partition: int
    decided: list[Assignment]  # decided now
    resend: list[Assignment]  # decided before, maybe never sent: sent unchanged
    report: WindowReport | None  # None when nothing was solved

    @property
    def outgoing(self) -> list[Assignment]:
        return [*self.decided, *self.resend]


def account_after(report: WindowReport) -> PoolAccount:
    return PoolAccount(
        billed_until=report.window_end, exploration_carried_usd=report.exploration_carried_usd
    )


class Publisher(Protocol):
    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        """Publish the window; False when it was left to the partition's new owner."""
        ...


@dataclass(frozen=True)
class AcknowledgedPublisher:
    topics: Topics
    decisions: DecisionLog
    ledger: PoolLedger

    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        if window.decided:
            await self.decisions.decide(window.decided, window.partition)  # durable first
            if not still_current():
                return False
        routes = self.topics.routes
        sends = [
            await routes[a.model].send(key=a.query_id.encode(), value=encode(a))
            for a in window.outgoing
        ]
        await asyncio.gather(*sends)
        self.decisions.mark_published(
            [a.query_id for a in window.outgoing], window.partition, time.time()
        )
        if window.report is not None:
            report = window.report
            await self.topics.windows.send(key=report.pool.encode(), value=encode(report))
            self.ledger.record(report.pool, window.partition, account_after(report))
        return True


@dataclass(frozen=True)
class TransactionalPublisher:
    topics: Topics
    decisions: DecisionLog
    ledger: PoolLedger
    producers: PartitionProducers

    async def publish(self, window: PoolWindow, still_current: Callable[[], bool]) -> bool:
        # Committed together, a decision and its assignment need no "decided" step:
        # the entry is the published marker from the start (read_committed recovery
        # never sees an aborted one).
        published = self.decisions.published_entries(
            [a.query_id for a in window.outgoing], window.partition, time.time()
        )
        ledger_entry = (
            None
            if window.report is None
            else self.ledger.entry(window.pool, account_after(window.report))
        )
        try:
            async with self.producers.transaction(window.partition) as producer:
                await self._write(producer, window, published, ledger_entry)
        except Fenced as exc:
            if still_current():  # fenced by no rebalance this router knows of: stop
                raise RuntimeError(f"pool {window.pool}: {exc} outside a rebalance") from exc
            log.warning("pool %s: %s; its window is left to the new owner", window.pool, exc)
            return False
        self.decisions.remember(published)
        if ledger_entry is not None:
            self.ledger.remember(*ledger_entry)
        return True

    async def _write(
        self,
        producer: AIOKafkaProducer,
        window: PoolWindow,
        published: list[tuple[bytes, bytes]],
        ledger_entry: tuple[bytes, bytes] | None,
    ) -> None:
        for key, value in published:
            await producer.send(
                self.decisions.changelog, value, key=key, partition=window.partition
            )
        for a in window.outgoing:
            route = self.topics.routes[a.model].get_topic_name()
            await producer.send(route, encode(a), key=a.query_id.encode())
        if window.report is not None and ledger_entry is not None:
            windows = self.topics.windows.get_topic_name()
            await producer.send(windows, encode(window.report), key=window.pool.encode())
            key, value = ledger_entry
            await producer.send(self.ledger.changelog, value, key=key, partition=window.partition)
