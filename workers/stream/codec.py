"""Bytes on a topic <-> event contracts, with a readable reason when bytes are bad."""

from __future__ import annotations

import base64
import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas import DeadLetter

EventT = TypeVar("EventT", bound=BaseModel)


class BadEvent(ValueError):
    """Bytes that are not a valid event; the message is the dead letter's reason."""


def decode(raw: bytes | None, event_type: type[EventT]) -> EventT:
    """Parse and validate; raise BadEvent naming what is wrong (never the content)."""
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


def _refuse_non_finite(constant: str) -> float:
    raise ValueError(f"{constant} is not a number JSON allows")


def encode(event: BaseModel) -> bytes:
    return event.model_dump_json().encode("utf-8")


def dead_letter(
    raw: bytes | None, topic: str, partition: int, offset: int, reason: str
) -> DeadLetter:
    return DeadLetter(
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        reason=reason,
        raw_base64=base64.b64encode(raw or b"").decode("ascii"),
    )
