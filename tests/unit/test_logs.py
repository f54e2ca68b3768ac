"""LOG_FORMAT=json: one JSON object per line, with the ids passed as `extra`."""

from __future__ import annotations

import io
import json
import logging

from workers.logs import JsonFormatter, logging_config


def test_a_json_line_carries_the_message_and_the_tracing_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.warning(
        "window %s: %d queries",
        "gold:w1",
        2,
        extra={"window_id": "gold:w1", "query_ids": ["a", "b"]},
    )
    line = json.loads(stream.getvalue())
    assert line["message"] == "window gold:w1: 2 queries"
    assert (line["level"], line["logger"]) == ("warning", "test.json")
    assert (line["window_id"], line["query_ids"]) == ("gold:w1", ["a", "b"])
    assert "args" not in line and "msg" not in line  # only what was asked for


def test_the_format_setting_picks_the_formatter() -> None:
    json_config = logging_config("info", "json")
    assert json_config["formatters"]["default"] == {"()": JsonFormatter}
    assert json_config["root"]["level"] == "INFO"
    assert "format" in logging_config("debug", "text")["formatters"]["default"]
