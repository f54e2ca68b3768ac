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
