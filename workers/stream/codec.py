"""Bytes on a topic <-> event contracts, with a readable reason when bytes are bad."""

from __future__ import annotations

import base64
import json
import re
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from schemas import DeadLetter

EventT = TypeVar("EventT", bound=BaseModel)


class BadEvent(ValueError):
    """Bytes that are not a valid event; the message is the dead letter's reason."""


# Bytes pydantic's own JSON parser might read otherwise than json.loads below: the
# non-finite constants json.loads refuses here, escapes (of lone surrogates among
# them), and integers longer than Python converts (which need that many bytes).
_READ_OTHERWISE = (b"NaN", b"Infinity", b"\\u")
_LONGEST_INTEGER_DIGITS = 4300
# Every digit as "0", every other byte as ".": a run of digits is then a substring
# search, linear in the bytes (a regex for the run retried at every digit of every
# number: 40 us per query of a batch of predictions).
_DIGITS_AS_ZEROS = bytes(ord("0") if ord("0") <= i <= ord("9") else ord(".") for i in range(256))
_LONGEST_RUN = b"0" * _LONGEST_INTEGER_DIGITS


def decode(raw: bytes | None, event_type: type[EventT]) -> EventT:
    """Parse and validate; raise BadEvent naming what is wrong (never the content).

    Valid events take pydantic's JSON parser, a third of the time of json.loads and
    validating the dict (the router decodes every query and every prediction); any
    failure, and bytes it could read otherwise, take the path below, which names
    the reason."""
    if raw is not None and _same_either_way(raw):
        try:
            return event_type.model_validate_json(raw)
        except ValidationError:
            pass
    return decode_via_json_module(raw, event_type)


def _same_either_way(raw: bytes) -> bool:
    return not any(token in raw for token in _READ_OTHERWISE) and (
        len(raw) < _LONGEST_INTEGER_DIGITS or _LONGEST_RUN not in raw.translate(_DIGITS_AS_ZEROS)
    )


def decode_via_json_module(raw: bytes | None, event_type: type[EventT]) -> EventT:
    """json.loads, then validation of the dict: the reason for any bad event."""
    if raw is None:
        raise BadEvent("empty message (no value)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadEvent(f"invalid UTF-8 at byte {exc.start}") from None
    try:
        payload = json.loads(text, parse_constant=_refuse_non_finite)
    except json.JSONDecodeError as exc:
        raise BadEvent(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadEvent("not JSON this service reads: nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, or an integer of more than 4,300 digits
        raise BadEvent(f"not JSON this service reads: {str(exc).split(':')[0]}") from None
    if not isinstance(payload, dict):
        raise BadEvent(f"not a JSON object but {type(payload).__name__}")
    try:
        return event_type.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or '(event)'}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        )
        raise BadEvent(f"invalid {event_type.__name__}: {problems}") from None


# An escape of half a surrogate pair: json.loads reads a lone one into a str that
# has no UTF-8, which fields without a length limit (metadata, hints) accept.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def refuse_unwritable(raw: bytes, event: BaseModel) -> None:
    """BadEvent for an event decoded from `raw` that could not be written again (a
    lone surrogate in a value: no UTF-8 for it). Checked only where `raw` holds a
    surrogate's escape, the one way such a string gets in."""
    if not _SURROGATE_ESCAPE.search(raw):
        return
    try:
        event.model_dump_json()
    except PydanticSerializationError:
        raise BadEvent("holds a lone surrogate (half a pair, no UTF-8 for it)") from None


# How deep a query may nest. Its records are read back with pydantic's JSON parser
# alone (200 levels), some holding it 5 levels down (a cascade probe's decision
# entry: the query's prediction in the probe's metadata); json.loads, the path of
# an event that parser refuses, reads about 1,000 and pydantic writes 255.
MAX_EVENT_DEPTH = 190


def refuse_too_deep(raw: bytes, event: dict[str, object]) -> None:
    """BadEvent for an event nested more than MAX_EVENT_DEPTH levels deep (`event`:
    its fields that hold containers, such as a query's metadata): metadata 300
    levels deep passed validation, then its prediction could not be encoded and the
    predict stage failed on it at every restart. Walked only where `raw` holds
    that many brackets."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_EVENT_DEPTH:
        return
    level: list[object] = [event]
    for _ in range(MAX_EVENT_DEPTH):
        level = [inner for value in level for inner in _containers_in(value)]
    if level:
        raise BadEvent(f"not JSON this service reads: nested more than {MAX_EVENT_DEPTH} deep")


def _containers_in(value: object) -> list[object]:
    """The objects and arrays directly inside a JSON object or array."""
    inner = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [item for item in inner if isinstance(item, dict | list)]


def _refuse_non_finite(constant: str) -> float:
    raise ValueError(f"{constant} is not a number JSON allows")


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode("utf-8")


# A dead letter is one record of one produce request, which the producer refuses
# above its max request size (Faust's producer_max_request_size). The letter's
# other fields (its reason at most MAX_REASON_CHARS), its key (at most a quarter
# of the request) and the record batch's framing fit in ENVELOPE_ROOM_BYTES and
# that quarter; the original bytes, base64-encoded (4 characters per 3 bytes),
# get the rest.
ENVELOPE_ROOM_BYTES = 16_384
MAX_REASON_CHARS = 1_000


def dead_letter(
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    reason: str,
    max_request_size: int | None = None,
) -> DeadLetter:
    """The letter for an event that could not be processed. With `max_request_size`,
    it keeps no more of the original bytes than fits in a request of that size:
    then an excerpt (their beginning), flagged `truncated`; the source position
    finds the whole."""
    value = raw or b""
    kept = value if max_request_size is None else value[: raw_bytes_that_fit(max_request_size)]
    return DeadLetter(
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        reason=bounded_reason(reason),
        raw_base64=base64.b64encode(kept).decode("ascii"),
        truncated=len(kept) < len(value),
        original_size_bytes=len(value),
    )


def undecodable_batch_letter(
    topic: str, partition: int, first_offset: int, last_offset: int, reason: str
) -> DeadLetter:
    """The letter for a record batch no record of which could be read: its offsets,
    not its bytes (the consumer never had them as records)."""
    return DeadLetter(
        source_topic=topic,
        source_partition=partition,
        source_offset=first_offset,
        source_last_offset=last_offset,
        reason=bounded_reason(reason),
        raw_base64="",
    )


def raw_bytes_that_fit(max_request_size: int) -> int:
    """How many original bytes a dead letter carries in a request of `max_request_size`."""
    room = max_request_size - max_request_size // 4 - ENVELOPE_ROOM_BYTES
    return max(0, room) * 3 // 4


def dead_letter_key(key: bytes | None, max_request_size: int) -> bytes | None:
    """The source's key for its dead letter, unless it alone would take more than a
    quarter of the request (then the letter goes unkeyed)."""
    return key if key is None or len(key) <= max_request_size // 4 else None


def bounded_reason(reason: str) -> str:
    """A reason cut to MAX_REASON_CHARS: some quote what they reject (a field name)."""
    if len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[: MAX_REASON_CHARS - 1] + "…"
