"""The JSON Schemas in schemas/jsonschema/ are the contracts consumers read: each must
be what its event model says today (`python -m schemas.export` writes them)."""

from __future__ import annotations

import json

import pytest

from schemas import ALL_EVENTS
from schemas.events import Event
from schemas.export import SCHEMA_DIR


@pytest.mark.parametrize("event", ALL_EVENTS, ids=lambda e: e.__name__)
def test_the_exported_schema_is_the_event_s_own(event: type[Event]) -> None:
    exported = json.loads((SCHEMA_DIR / f"{event.__name__}.json").read_text())
    assert exported == event.model_json_schema(), "run: python -m schemas.export"
