"""Write the JSON Schema of every event to schemas/jsonschema/ (run: python -m schemas.export)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.events import ALL_EVENTS

SCHEMA_DIR = Path(__file__).parent / "jsonschema"


def export(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for event in ALL_EVENTS:
        path = directory / f"{event.__name__}.json"
        path.write_text(json.dumps(event.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in export():
        print(path)
