"""The broker the tests and the demo use speaks real Kafka: topics, produce, consume."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from click.testing import CliRunner, Result

from workers.cli import main
from workers.config import Settings, model_topic
from workers.services import LocalBroker
from workers.stream.kafka_io import consume_values, produce_values
from workers.stream.topics import create_topics, describe_cleanup_policies, describe_partitions

pytestmark = pytest.mark.integration


async def test_topics_are_created_with_explicit_partitions_and_idempotently(
    kafka_bootstrap_servers: str,
) -> None:
    settings = Settings(kafka_partitions=3, router_models=["m/one", "m-two"])
    first = await create_topics(settings, kafka_bootstrap_servers)
    second = await create_topics(settings, kafka_bootstrap_servers)

    topics = sorted(settings.topic_names().values())
    assert sorted(first) == topics
    assert set(second.values()) == {"exists"}
    partitions = await describe_partitions(kafka_bootstrap_servers, topics)
    # Not the broker's auto-create default of 4: the count we asked for.
    assert partitions == dict.fromkeys(topics, 3)


async def test_table_changelogs_are_compacted_and_event_topics_are_not(
    kafka_bootstrap_servers: str,
) -> None:
    """A recovering router reads each decision once, not a day of history."""
    settings = Settings(kafka_partitions=3, router_models=["m/one", "m-two"])
    await create_topics(settings, kafka_bootstrap_servers)
    names = settings.topic_names()
    policies = await describe_cleanup_policies(kafka_bootstrap_servers, list(names.values()))
    for role, topic in names.items():
        assert policies[topic] == ("compact" if role.endswith("_changelog") else "delete"), role


async def create_topics_of(bootstrap: str, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, n, 1) for t, n in partitions.items()])
    finally:
        await admin.close()


async def topic_names(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def topics_create(bootstrap: str, models: list[str]) -> Result:
    return CliRunner().invoke(
        main,
        ["topics", "create"],
        env={
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAFKA_PARTITIONS": "3",
            "ROUTER_MODELS": json.dumps(models),
        },
    )


def test_topics_create_reports_each_paired_topic_of_another_count_and_changes_none() -> None:
    """The router's tables need co-partitioned topics: an existing topic of another
    count was accepted as it was. Adding partitions would move keys: none are added.
    A route topic may have any count (more workers of one model): it is shown, not
    refused. A broker of its own: the paired topics' names are fixed."""
    settings = Settings(kafka_partitions=3, router_models=["m-one", "m-two"])
    names = settings.topic_names()
    predicted, changelog = names["predicted"], names["routed_changelog"]
    route = names["route:m-one"]
    with LocalBroker() as broker:
        counts = {predicted: 1, changelog: 5, route: 6}
        asyncio.run(create_topics_of(broker.bootstrap_servers, counts))

        result = topics_create(broker.bootstrap_servers, ["m-one", "m-two"])

        print(result.output)
        assert result.exit_code == 1
        lines = result.output.splitlines()
        assert f"{predicted}: has 1, configured 3" in lines
        assert f"{changelog}: has 5, configured 3" in lines
        assert not any(line.startswith(route) for line in lines)
        assert asyncio.run(describe_partitions(broker.bootstrap_servers, list(counts))) == counts
        assert names["queries"] not in asyncio.run(topic_names(broker.bootstrap_servers))


def test_topics_create_keeps_a_route_topic_of_another_count(kafka_bootstrap_servers: str) -> None:
    run = uuid.uuid4().hex[:8]
    many, new = f"many-{run}", f"new-{run}"
    asyncio.run(create_topics_of(kafka_bootstrap_servers, {model_topic(many): 5}))

    result = topics_create(kafka_bootstrap_servers, ["m/one", "m-two", many, new])

    print(result.output)
    assert result.exit_code == 0
    assert f"exists, 5 partitions {model_topic(many)}" in result.output
    assert f"created  {model_topic(new)}" in result.output.splitlines()


async def test_values_produced_are_consumed_back_in_full(kafka_bootstrap_servers: str) -> None:
    topic = f"test.roundtrip.{uuid.uuid4().hex[:8]}"
    sent = [(f"k{i}", f"value-{i}") for i in range(250)]

    await produce_values(kafka_bootstrap_servers, topic, sent)
    received = await consume_values(kafka_bootstrap_servers, topic, expected=len(sent))

    print(f"produced {len(sent)} to {topic}, consumed {len(received)}")
    assert sorted(v.decode() for v in received) == sorted(v for _, v in sent)
