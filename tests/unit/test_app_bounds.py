"""What a worker's Faust app holds ahead of its agents
(docs/history-pipeline-speed.md, sixth pass)."""

from __future__ import annotations

from workers.config import Settings
from workers.stream.app import RECORDS_PER_POLL, STREAM_BUFFER_EVENTS, make_app


def test_a_worker_buffers_a_few_batches_ahead_not_a_backlog() -> None:
    """Faust's defaults (4,096 events per stream, every fetched record at once) held
    a burst's backlog in a router's memory; a few predict batches ahead are enough."""
    settings = Settings()
    app = make_app("bounds-test", settings, "127.0.0.1:9")
    assert app.conf.stream_buffer_maxsize == STREAM_BUFFER_EVENTS
    assert app.conf.broker_max_poll_records == RECORDS_PER_POLL
    # At least four micro-batches of queries ahead, so the predict stage never waits.
    assert 4 * settings.router_predict_batch <= STREAM_BUFFER_EVENTS
    assert STREAM_BUFFER_EVENTS < 4096 and RECORDS_PER_POLL < 4096
