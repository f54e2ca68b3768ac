"""A worker whose agent fails on one record, for tests of the shared batch mechanism.

`python -m tests.apps.failing_agent` with KAFKA_BOOTSTRAP_SERVERS set: it reads
the topic `test.batches` in batches (workers/stream/app.py `batches`, what every
agent of the product uses), echoes each value to `test.batches.done`, and raises
on the value `boom`, as a bug or an unexpected error in an agent body would.
"""

from __future__ import annotations

import os
from typing import Any

from mode import CrashingSupervisor

from workers.config import Settings
from workers.stream.app import batches, make_app, run_worker

GROUP = "test-failing-agent"
SOURCE = "test.batches"
DONE = "test.batches.done"


def main() -> None:
    settings = Settings(metrics_port=0)
    app = make_app(GROUP, settings, os.environ["KAFKA_BOOTSTRAP_SERVERS"])
    source = app.topic(SOURCE, key_serializer="raw", value_serializer="raw")
    done = app.topic(DONE, key_serializer="raw", value_serializer="raw")

    @app.agent(source, supervisor_strategy=CrashingSupervisor)
    async def echo(stream: Any) -> None:
        async for events in batches(stream, 10, 0.2):
            for event in events:
                if event.message.value == b"boom":
                    raise RuntimeError("an agent body failed")
                await done.send(key=event.message.key, value=event.message.value)

    run_worker(app, settings, 0, "info")


if __name__ == "__main__":
    main()
