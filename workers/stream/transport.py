"""Faust's aiokafka transport with a configurable fetch wait.

Faust fixes its consumers' fetch_max_wait_ms at 1,500 ms. Apache Kafka answers
a fetch as soon as data arrives, but some Kafka-compatible brokers (the local
Tansu broker among them) hold every fetch for the whole wait, which adds up to
1.5 s to each hop of the pipeline. This transport, registered for the URL
scheme `omnikafka://` through Faust's `faust.transports` entry point, sets the
wait from KAFKA_FETCH_MAX_WAIT_MS instead (make_app hands it to the app).
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import aiokafka as faust_aiokafka

FETCH_MAX_WAIT_ATTRIBUTE = "omnirouter_fetch_max_wait_ms"


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, *args: Any, **kwargs: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(*args, **kwargs)
        # Read by the consumer when it starts its fetcher.
        consumer._fetch_max_wait_ms = getattr(self.app, FETCH_MAX_WAIT_ATTRIBUTE, 1500)
        return consumer


class Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
