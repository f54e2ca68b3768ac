"""`topics create` reads existing topics' partition counts from the broker's metadata."""

from __future__ import annotations

import pytest

from workers.stream.topics import partition_counts


def test_partition_counts_are_read_from_the_metadata() -> None:
    described = [
        {"topic": "a", "error_code": 0, "partitions": [{"partition": 0}, {"partition": 1}]},
        {"topic": "b", "error_code": 0, "partitions": [{"partition": 0}]},
    ]
    assert partition_counts(described) == {"a": 2, "b": 1}


def test_a_topic_the_broker_reports_with_an_error_is_an_error_not_zero_partitions() -> None:
    """Found by review: a topic being deleted (error 3) or not authorised (29) has no
    partitions listed, and was reported as 'has 0, configured 4'."""
    described = [
        {"topic": "a", "error_code": 0, "partitions": [{"partition": 0}]},
        {"topic": "b", "error_code": 29, "partitions": []},
    ]
    with pytest.raises(RuntimeError, match="b: error code 29"):
        partition_counts(described)
