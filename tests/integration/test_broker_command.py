"""`omnirouter broker`, stopped as an operator or a supervisor stops it, stops its broker."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys

import pytest

from tests.faults import wait_until
from workers.services import free_port, wait_for_port

pytestmark = pytest.mark.integration


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_broker_command_leaves_no_broker_running(stop: signal.Signals) -> None:
    port = free_port()
    command = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout_seconds=20)
        command.send_signal(stop)
        assert command.wait(timeout=30) == 0
        wait_until(lambda: not listening(port), 15, f"the broker on port {port} to stop")
    finally:
        if command.poll() is None:
            command.kill()
