"""The consumer's `wait_first` (workers/stream/transport.py `FirstRunAtOnce`): Faust's
fetch loop delivers each record through it, racing the delivery against the flow's
suspension. It must give what mode's `Service.wait_first` gives, with no task made
for a delivery that finishes without waiting."""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable

import pytest
from mode import Service

from workers.stream.transport import FirstRunAtOnce


class Plain(Service):
    pass


class AtOnce(FirstRunAtOnce):
    pass


async def until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0)


async def delivered(log: list[str], value: str) -> str:
    log.append(value)
    return value


async def waits_for(event: asyncio.Event, log: list[str]) -> str:
    log.append("waiting")
    try:
        await event.wait()
    except asyncio.CancelledError:
        log.append("cancelled")
        raise
    log.append("resumed")
    return "late"


async def test_a_delivery_that_does_not_wait_makes_no_task() -> None:
    service, log, suspended = AtOnce(), [], asyncio.Event()
    tasks = len(asyncio.all_tasks())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the suspension's coroutine is closed, not leaked
        result = await service.wait_first(delivered(log, "r1"), suspended.wait())
    assert (result.results, result.stopped, log) == (["r1"], False, ["r1"])
    assert len(asyncio.all_tasks()) == tasks


@pytest.mark.parametrize("kind", [Plain, AtOnce])
async def test_a_delivery_that_waits_finishes_as_before(kind: type[Service]) -> None:
    service, log, ready, suspended = kind(), [], asyncio.Event(), asyncio.Event()
    waiting = asyncio.ensure_future(service.wait_first(waits_for(ready, log), suspended.wait()))
    await until(lambda: log == ["waiting"])
    assert not waiting.done()
    ready.set()
    result = await asyncio.wait_for(waiting, 1)
    assert (result.results, result.stopped, log) == (["late"], False, ["waiting", "resumed"])


@pytest.mark.parametrize("kind", [Plain, AtOnce])
async def test_a_suspended_flow_wins_over_a_waiting_delivery(kind: type[Service]) -> None:
    service, log, ready, suspended = kind(), [], asyncio.Event(), asyncio.Event()
    waiting = asyncio.ensure_future(service.wait_first(waits_for(ready, log), suspended.wait()))
    await until(lambda: log == ["waiting"])
    suspended.set()
    result = await asyncio.wait_for(waiting, 1)
    assert result.results == [True] and not result.stopped  # the suspension's wait won
    await until(lambda: len(log) > 1)
    assert log == ["waiting", "cancelled"]  # the delivery never went on


@pytest.mark.parametrize("kind", [Plain, AtOnce])
async def test_a_failing_delivery_raises(kind: type[Service]) -> None:
    async def fails() -> None:
        raise ValueError("undecodable")

    with pytest.raises(ValueError, match="undecodable"):
        await kind().wait_first(fails(), asyncio.Event().wait())


async def test_a_stopped_service_reports_stopped() -> None:
    service, log = AtOnce(), []
    service._stopped.set()
    result = await service.wait_first(delivered(log, "r1"), asyncio.Event().wait())
    assert result.stopped
