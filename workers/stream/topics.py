"""Create every topic the product uses, with explicit partition counts.

Brokers that auto-create unknown topics pick their own partition count, which
breaks Faust tables (PartitionsMismatch); so topics are created up front.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from workers.config import ConfigurationError, Settings
from workers.stream.security import aiokafka_options

# Topics whose partitions the routers pair (Faust's co-partitioning: a query's
# prediction, probes, answers and table entries must sit on one partition number).
# Other topics (a model's route topic, outcomes, windows, dead letters) may have
# any count: more partitions on a route topic let more of its workers share it.
COPARTITIONED_ROLES = frozenset({"queries", "predicted", "probed", "responses"})


def copartitioned(role: str) -> bool:
    return role in COPARTITIONED_ROLES or role.endswith("_changelog")


class TopicPartitionsMismatch(ConfigurationError):
    """Existing co-partitioned topics whose partition count is not KAFKA_PARTITIONS:
    the router's tables need them alike, and adding partitions would move keys to
    other partitions, so the operator decides (recreate them, or set the count)."""

    def __init__(self, counts: dict[str, int], configured: int) -> None:
        lines = [
            f"{topic}: has {count}, configured {configured}" for topic, count in counts.items()
        ]
        super().__init__(
            f"existing topics whose partition count is not KAFKA_PARTITIONS={configured} "
            "(nothing was created or changed):\n" + "\n".join(lines)
        )


async def create_topics(settings: Settings, bootstrap_servers: str) -> dict[str, str]:
    """Create missing topics; return {topic: "created" | "exists" | "exists, N
    partitions"} (the last for a topic of another count than KAFKA_PARTITIONS that
    need not match it). Raises TopicPartitionsMismatch, before creating any, if an
    existing co-partitioned topic has another count."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **aiokafka_options(settings))
    await admin.start()
    try:
        names = settings.topic_names()
        wanted = sorted(set(names.values()))
        present = sorted(set(await admin.list_topics()) & set(wanted))
        existing = await _partition_counts(admin, present)
        paired = {topic for role, topic in names.items() if copartitioned(role)}
        other_count = {t: n for t, n in existing.items() if n != settings.kafka_partitions}
        mismatched = {t: n for t, n in other_count.items() if t in paired}
        if mismatched:
            raise TopicPartitionsMismatch(mismatched, settings.kafka_partitions)
        compacted = {topic for role, topic in names.items() if role.endswith("_changelog")}
        missing = [t for t in wanted if t not in existing]
        if missing:
            new_topics = [
                NewTopic(
                    name=t,
                    num_partitions=settings.kafka_partitions,
                    replication_factor=settings.kafka_replication_factor,
                    # A table's changelog keeps the latest entry per key, so a
                    # recovering router reads each key once, not the whole history.
                    topic_configs={"cleanup.policy": "compact"} if t in compacted else {},
                )
                for t in missing
            ]
            response = await admin.create_topics(new_topics)
            for topic, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise RuntimeError(f"could not create topic {topic}: error code {code}")
        return {t: _state(t, missing, other_count) for t in wanted}
    finally:
        await admin.close()


def _state(topic: str, missing: list[str], other_count: dict[str, int]) -> str:
    if topic in missing:
        return "created"
    if topic in other_count:
        return f"exists, {other_count[topic]} partitions"
    return "exists"


async def _partition_counts(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    if not topics:
        return {}
    return partition_counts(await admin.describe_topics(topics))


def partition_counts(described: list[dict[str, Any]]) -> dict[str, int]:
    """Each topic's partition count from a metadata answer (aiokafka's
    describe_topics). A topic the broker reports with an error (being deleted, not
    authorised) has no partitions listed: an error, not "0 partitions"."""
    failed = [f"{d['topic']}: error code {d['error_code']}" for d in described if d["error_code"]]
    if failed:
        raise RuntimeError("could not describe topics: " + "; ".join(failed))
    return {d["topic"]: len(d["partitions"]) for d in described}


async def describe_partitions(bootstrap_servers: str, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic, as the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        return await _partition_counts(admin, topics)
    finally:
        await admin.close()


async def describe_cleanup_policies(bootstrap_servers: str, topics: list[str]) -> dict[str, str]:
    """Each topic's cleanup.policy as the broker reports it ("delete" when unset)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        resources = [ConfigResource(ConfigResourceType.TOPIC, topic) for topic in topics]
        policies = dict.fromkeys(topics, "delete")
        for response in await admin.describe_configs(resources):
            for _, _, _, name, entries in response.resources:
                for entry in entries:
                    if entry[0] == "cleanup.policy" and entry[1]:
                        policies[name] = entry[1]
        return policies
    finally:
        await admin.close()
