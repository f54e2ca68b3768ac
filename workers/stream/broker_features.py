"""What the broker can do, asked of the broker itself.

Transactions fence a router that lost its partitions (its producer's epoch is
bumped by the successor's InitProducerId, so its commit fails) and commit the
consumed offsets together with what was produced. Apache Kafka and noida-db
support them; the local Tansu broker answers no InitProducerId. The router
therefore asks once, before it starts, and uses transactions where the answer is
yes and generation-checked decisions elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from workers.config import Settings
from workers.stream.security import aiokafka_options

log = logging.getLogger(__name__)

PROBE_TRANSACTIONAL_ID = "omnirouter-transactions-probe"


async def supports_transactions(
    bootstrap_servers: str,
    timeout_seconds: float = 5.0,
    security: Mapping[str, Any] | None = None,
    transactional_id: str = PROBE_TRANSACTIONAL_ID,
) -> bool:
    """Whether the broker hands a transactional producer its producer id.

    Starting an aiokafka producer with a transactional id finds the transaction
    coordinator and sends InitProducerId; the answer (or none within
    `timeout_seconds`) is the answer. The probe sends nothing, so one fixed
    transactional id serves every router (one id for an ACL to allow). A broker
    that cannot be reached raises KafkaConnectionError instead: that says nothing
    about transactions. `security` is workers.stream.security.aiokafka_options.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        transactional_id=transactional_id,
        request_timeout_ms=max(1, int(timeout_seconds * 1000)),
        **(security or {}),
    )
    try:
        await producer.client.bootstrap()  # unreachable: KafkaConnectionError, raised
        await asyncio.wait_for(producer.start(), timeout_seconds)
        return True
    except KafkaConnectionError:
        raise
    except (KafkaError, TimeoutError) as error:
        log.warning(
            "the broker at %s gave no transactional producer id (%s): no transactions",
            bootstrap_servers,
            type(error).__name__,
        )
        return False
    finally:
        await producer.stop()


class TransactionsUnavailable(RuntimeError):
    """KAFKA_TRANSACTIONS=on, and the broker gives no transactional producer id."""


async def use_transactions(settings: Settings, bootstrap_servers: str) -> bool:
    """KAFKA_TRANSACTIONS resolved against the broker, once, at a router's start:
    "off" never asks; "auto" uses transactions when the broker has them; "on"
    insists, so a broker without them is an error instead of a silent downgrade."""
    if settings.kafka_transactions == "off":
        return False
    supported = await supports_transactions(bootstrap_servers, security=aiokafka_options(settings))
    if not supported and settings.kafka_transactions == "on":
        raise TransactionsUnavailable(
            f"KAFKA_TRANSACTIONS=on, but the broker at {bootstrap_servers} gives no "
            "transactional producer id (InitProducerId): set it to auto or off"
        )
    return supported
