"""Dead letters of any size fit in one produce request; the contract's versions read."""

from __future__ import annotations

import base64
import json

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from schemas import DeadLetter
from workers.stream.codec import (
    MAX_REASON_CHARS,
    dead_letter,
    dead_letter_key,
    encode,
    undecodable_batch_letter,
)

FAUST_DEFAULT_MAX_REQUEST_SIZE = 1_000_000


def request_size(key: bytes | None, value: bytes) -> int:
    """What aiokafka's producer compares with its max_request_size before it sends."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, []))


def test_a_small_event_is_kept_whole() -> None:
    raw = b'{"query_id": "q", "text": 42}'
    letter = dead_letter(raw, "omnirouter.queries", 1, 7, "invalid", FAUST_DEFAULT_MAX_REQUEST_SIZE)
    assert base64.b64decode(letter.raw_base64) == raw
    assert (letter.truncated, letter.original_size_bytes) == (False, len(raw))


@pytest.mark.parametrize("limit", [100_000, FAUST_DEFAULT_MAX_REQUEST_SIZE, 10_485_760])
def test_the_worst_dead_letter_still_fits_the_producer_s_request(limit: int) -> None:
    """Every part at its largest: the event, a key of a quarter of the request, a
    reason of control characters (6 JSON bytes each), the longest topic name."""
    raw = bytes(range(256)) * (2 * limit // 256)  # twice the request
    key = b"k" * (limit // 4)
    reason = "\x01" * (10 * MAX_REASON_CHARS)
    letter = dead_letter(raw, "t" * 249, 2**31 - 1, 2**63 - 1, reason, limit)
    value = encode(letter)
    assert request_size(dead_letter_key(key, limit), value) <= limit
    excerpt = base64.b64decode(letter.raw_base64)
    assert letter.truncated and letter.original_size_bytes == len(raw)
    assert raw.startswith(excerpt) and len(excerpt) > limit // 3  # most of what fits
    assert len(letter.reason) == MAX_REASON_CHARS


def test_a_key_longer_than_a_quarter_of_the_request_is_not_kept() -> None:
    assert dead_letter_key(b"q-17", 1000) == b"q-17"
    assert dead_letter_key(b"k" * 251, 1000) is None
    assert dead_letter_key(None, 1000) is None


def test_an_undecodable_batch_is_named_by_its_offsets() -> None:
    letter = undecodable_batch_letter("omnirouter.queries", 0, 5, 9, "undecodable record batch")
    assert (letter.source_offset, letter.source_last_offset, letter.raw_base64) == (5, 9, "")
    assert letter.original_size_bytes is None  # unknown: its bytes never became records


def test_version_1_letters_still_read_and_new_ones_are_version_2() -> None:
    old = {
        "schema_version": 1,
        "source_topic": "omnirouter.queries",
        "source_partition": 0,
        "source_offset": 3,
        "reason": "not JSON",
        "raw_base64": "e30=",
        "created_at": "2026-11-25T10:00:00Z",
    }
    letter = DeadLetter.model_validate_json(json.dumps(old))
    assert (letter.schema_version, letter.truncated, letter.original_size_bytes) == (1, False, None)
    assert dead_letter(b"{}", "t", 0, 0, "r").schema_version == 2
