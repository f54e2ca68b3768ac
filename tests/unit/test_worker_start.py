"""What `run_worker` does before Faust's worker runs."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from workers.config import Settings
from workers.stream import app as app_module


def test_what_start_up_built_is_frozen_before_the_worker_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full collections must not walk the start-up objects (imports, the retrieval
    store) again and again: each took ~0.2 s of a busy router's event loop."""
    frozen_when_run: list[int] = []

    class Worker:
        spinner: object = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def execute_from_commandline(self) -> None:
            frozen_when_run.append(gc.get_freeze_count())

    monkeypatch.setattr(app_module.faust, "Worker", Worker)
    try:
        settings = Settings(metrics_port=0)
        app_module.run_worker(object(), settings, 0, "warning")  # type: ignore[arg-type]
    finally:
        gc.unfreeze()
    assert frozen_when_run and frozen_when_run[0] > 0
