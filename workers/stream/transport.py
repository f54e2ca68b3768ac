"""Faust's aiokafka transport, with fixes the router's guarantees rely on.

1. A configurable fetch wait. Faust fixes its consumers' fetch_max_wait_ms at
   1,500 ms. Apache Kafka answers a fetch as soon as data arrives, but some
   Kafka-compatible brokers (the local Tansu broker among them) hold every
   fetch for the whole wait, which adds up to 1.5 s to each hop of the
   pipeline. The wait comes from KAFKA_FETCH_MAX_WAIT_MS instead.
2. No skipped records on a partition that has no committed offset yet. While
   a worker recovers its tables after a rebalance, Faust drops the records its
   fetcher returns and afterwards seeks each partition back to its committed
   offset; a partition with none (a worker killed before its first commit) was
   left where the fetcher stopped, past records nobody processed. Such a
   partition is now sent back to its beginning, as `auto_offset_reset=earliest`
   promises (found by tests/integration/test_crash_recovery.py).
3. No skipped records after the seek either. A fetched batch that Faust is
   still handing out when the seek runs goes on marking its records as read
   (while recovery holds the flow it hands them to nobody), which can undo the
   seek's read position: the refetched records then look already read and are
   dropped (a few queries lost in about one restart in six). The seek is
   therefore done again once that batch has run out.
4. Changelog ends read from a fetch. Some Kafka-compatible brokers (the local
   Tansu broker among them) answer a partition's end offset with the start of
   its last record batch + 1, not its end. Faust recovers a table up to that
   end, so a restarted router missed the last decisions of its changelog; and a
   router that had already read further (an earlier assignment) crashed on
   Faust's consistency check ("persisted offset ... is higher than the last
   offset in that topic"). The end is therefore confirmed by fetching the last
   batch: a fetch response carries the partition's true high watermark.

The transport is registered for the URL scheme `omnikafka://` through Faust's
`faust.transports` entry point; make_app uses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

FETCH_MAX_WAIT_ATTRIBUTE = "omnirouter_fetch_max_wait_ms"
SEEK_SETTLE_SECONDS = 0.5
END_PROBE_TIMEOUT_SECONDS = 10.0


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, *args: Any, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(*args, **kwargs)
        # Read by the consumer when it starts its fetcher.
        consumer._fetch_max_wait_ms = getattr(self.app, FETCH_MAX_WAIT_ATTRIBUTE, 1500)
        return consumer

    async def _highwaters(self, partitions: Iterable[TP]) -> Mapping[TP, int]:
        reported = await super()._highwaters(list(partitions))
        if self.consumer.in_transaction:
            return reported  # last stable offsets, not ends
        return await self._confirmed_ends(reported)

    async def _confirmed_ends(self, reported: Mapping[TP, int]) -> dict[TP, int]:
        """Each partition's end as the high watermark of a fetch of its last batch,
        on a consumer of no group (so nothing is committed or rebalanced)."""
        ends = dict(reported)
        pending = {tp for tp, end in reported.items() if end}
        if not pending:
            return ends
        probe = self._create_client_consumer(cast(faust_aiokafka.Transport, self.transport))
        await probe.start()
        try:
            probe.assign(list(pending))
            for tp in pending:
                probe.seek(tp, reported[tp] - 1)
            deadline = time.monotonic() + END_PROBE_TIMEOUT_SECONDS
            while pending and time.monotonic() < deadline:
                await probe.getmany(*pending, timeout_ms=200)
                for tp in list(pending):
                    if (highwater := probe.highwater(tp)) is not None:
                        ends[tp] = max(ends[tp], highwater)
                        pending.discard(tp)
        finally:
            await probe.stop()
        return ends

    async def seek_to_committed(self) -> Mapping[TP, int]:
        committed = await super().seek_to_committed()
        changelogs = self.app.tables.changelog_topics
        never_committed = [
            tp for tp, offset in committed.items() if offset is None and tp.topic not in changelogs
        ]
        if never_committed:
            await self.seek_to_beginning(*never_committed)
        return committed


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        await asyncio.sleep(SEEK_SETTLE_SECONDS)  # the batch in hand runs out meanwhile
        await super().perform_seek()


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
