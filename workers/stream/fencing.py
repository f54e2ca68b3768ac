"""Kafka transactions that fence a router which lost its partitions.

The router owning partition p of omnirouter.predicted holds one transactional
producer whose id names that partition. Taking the partition over starts a
producer with the same id: the broker's InitProducerId aborts whatever the
previous owner left open and bumps the id's epoch, so every later write or
commit of the previous owner is refused (ProducerFenced). A window's decisions,
assignments, report and pool ledger entry are written in one transaction:
consumers reading committed records see all of them or none.

Producers are started before Faust recovers the router's tables on an
assignment (`on_assigned`, called by the transport before Faust's own
handling), so the recovered decisions include everything the previous owner
committed, and nothing it commits afterwards can exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import InvalidProducerEpoch, KafkaError, ProducerFenced
from faust.types import TP

log = logging.getLogger(__name__)

# What the broker answers a producer whose transactional id a newer producer took.
FENCED_ERRORS = (ProducerFenced, InvalidProducerEpoch)


class Fenced(RuntimeError):
    """This router may not write for the partition: it does not own it (any more)."""


def transactional_id(group: str, topic: str, partition: int) -> str:
    """One id per partition of the input topic: whoever owns the partition uses it."""
    return f"{group}-{topic}-{partition}"


class PartitionProducers:
    """One transactional producer per owned partition of `topic`."""

    def __init__(self, group: str, topic: str, producer_options: Mapping[str, Any]) -> None:
        self.group = group
        self.topic = topic
        self._options = dict(producer_options)
        self._producers: dict[int, AIOKafkaProducer] = {}
        # A producer has one transaction open at a time; a partition's windows of
        # different pools (published by different agents) take turns.
        self._turns: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    @property
    def owned(self) -> set[int]:
        return set(self._producers)

    async def on_assigned(self, assigned: Iterable[TP]) -> None:
        """Stop the producers of partitions this router lost; start (and so fence
        the previous owner of) each partition it gained."""
        owned = {tp.partition for tp in assigned if tp.topic == self.topic}
        for partition in sorted(set(self._producers) - owned):
            await self._drop(partition)
        for partition in sorted(owned - set(self._producers)):
            producer = AIOKafkaProducer(
                transactional_id=transactional_id(self.group, self.topic, partition),
                **self._options,
            )
            await producer.start()  # InitProducerId: the previous owner is fenced from now on
            self._producers[partition] = producer
        if owned:
            log.info("transactional producers for %s partitions %s", self.topic, sorted(owned))

    @asynccontextmanager
    async def transaction(self, partition: int) -> AsyncIterator[AIOKafkaProducer]:
        """A transaction on the partition's producer, committed when the block ends
        and aborted if it raises; one at a time per partition. Fenced when this
        router does not own the partition or another router took it over meanwhile
        (the producer is then dropped)."""
        async with self._turns[partition]:
            producer = self._producers.get(partition)
            if producer is None:
                raise Fenced(f"{self.topic}[{partition}] is not assigned to this router")
            try:
                async with producer.transaction():
                    yield producer
            except FENCED_ERRORS as exc:
                await self._drop(partition)
                raise Fenced(f"{self.topic}[{partition}]: {type(exc).__name__}") from exc

    async def stop(self) -> None:
        for partition in list(self._producers):
            await self._drop(partition)

    async def _drop(self, partition: int) -> None:
        producer = self._producers.pop(partition, None)
        if producer is None:
            return
        try:
            await producer.stop()
        except KafkaError:
            log.warning("producer of %s[%d] stopped with an error", self.topic, partition)
