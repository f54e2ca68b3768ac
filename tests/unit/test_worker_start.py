"""What `run_worker` does before Faust's worker runs."""

from __future__ import annotations

import gc
import socket
import urllib.request
from typing import Any

import pytest

from workers.config import Settings
from workers.stream import app as app_module
from workers.stream import metrics as metrics_module


class FakeWorker:
    """Faust's Worker, recording what start-up left when it would have run."""

    spinner: object = None
    frozen_when_run: list[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def execute_from_commandline(self) -> None:
        FakeWorker.frozen_when_run.append(gc.get_freeze_count())


def start_worker(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    FakeWorker.frozen_when_run = []
    monkeypatch.setattr(app_module.faust, "Worker", FakeWorker)
    try:
        app_module.run_worker(object(), settings, 0, "warning")  # type: ignore[arg-type]
    finally:
        gc.unfreeze()


def test_what_start_up_built_is_frozen_before_the_worker_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full collections must not walk the start-up objects (imports, the retrieval
    store) again and again: each took ~0.2 s of a busy router's event loop."""
    start_worker(monkeypatch, Settings(metrics_port=0))
    assert FakeWorker.frozen_when_run and FakeWorker.frozen_when_run[0] > 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("metrics_host", "listening", "elsewhere"),
    [(None, "127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.2", "127.0.0.1")],
)
def test_metrics_listen_on_the_configured_host_only(
    monkeypatch: pytest.MonkeyPatch, metrics_host: str | None, listening: str, elsewhere: str
) -> None:
    """On 0.0.0.0 a laptop's metrics were served on every interface it has. Linux
    routes all of 127.0.0.0/8 to loopback: a server on 0.0.0.0 answers on both."""
    servers = []
    serve = metrics_module.start_http_server

    def recorded(*args: Any, **kwargs: Any) -> Any:
        server, thread = serve(*args, **kwargs)
        servers.append(server)
        return server, thread

    monkeypatch.setattr(metrics_module, "start_http_server", recorded)
    port = free_port()
    monkeypatch.setenv("METRICS_PORT", str(port))
    if metrics_host is not None:
        monkeypatch.setenv("METRICS_HOST", metrics_host)
    start_worker(monkeypatch, Settings())
    try:
        with urllib.request.urlopen(f"http://{listening}:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((elsewhere, port), timeout=5).close()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
