"""The predict stage's two batches in flight (workers/stream/predict_stage.py
`pipelined`): the next batch is read while one is predicted, batches are sent
in the order read whatever order their predictions finish in, each is released
only once sent (a batch with nothing valid too), a failure leaves its batch
unreleased, a prediction cancelled on its own fails the stage instead of
stalling it, and no more than two batches are in flight.

Plain asyncio: the steps are stand-ins that record what happened, the events
stand-ins with Faust's `ack`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from faust.types import EventT

from schemas import PredictedBatch, QueryEvent
from workers.stream.predict_stage import pipelined

DEADLINE_SECONDS = 5.0


class HeldEvent:
    """What `release` needs of a Faust event: its `ack`."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.acked = False

    def ack(self) -> None:
        self.acked = True


def batches_of(count: int) -> tuple[list[list[HeldEvent]], AsyncIterator[Sequence[EventT]]]:
    """`count` batches of two events each, and an iterator over them."""
    made = [[HeldEvent(b), HeldEvent(b)] for b in range(count)]

    async def iterate() -> AsyncIterator[Sequence[EventT]]:
        for batch in made:
            yield cast(Sequence[EventT], batch)

    return made, iterate()


def query_of(batch: int) -> QueryEvent:
    return QueryEvent(query_id=f"q{batch}", text="t", pool="default")


def predicted(queries: list[QueryEvent]) -> PredictedBatch:
    return PredictedBatch.model_construct(queries=queries)


async def decode(events: Sequence[Any]) -> list[QueryEvent]:
    return [query_of(events[0].batch)]


def batch_of(prediction: PredictedBatch) -> int:
    return int(prediction.queries[0].query_id[1:])


def test_the_next_batch_is_decoded_while_one_is_predicted() -> None:
    """Batch 0's prediction finishes only once batch 1 has been decoded: one step
    after another, this waits forever."""

    async def run() -> list[int]:
        decoded: list[int] = []
        second_decoded = asyncio.Event()
        sent: list[int] = []

        async def decode_and_note(events: Sequence[Any]) -> list[QueryEvent]:
            decoded.append(events[0].batch)
            if len(decoded) == 2:
                second_decoded.set()
            return await decode(events)

        async def predict(queries: list[QueryEvent]) -> PredictedBatch:
            if batch_of(predicted(queries)) == 0:
                await second_decoded.wait()
            return predicted(queries)

        async def send(prediction: PredictedBatch) -> None:
            sent.append(batch_of(prediction))

        _, held = batches_of(3)
        await asyncio.wait_for(pipelined(held, decode_and_note, predict, send), DEADLINE_SECONDS)
        return sent

    assert asyncio.run(run()) == [0, 1, 2]


def test_batches_are_sent_in_the_order_read_and_released_once_sent() -> None:
    """Later batches' predictions finish first; they still wait their turn, and no
    event is released before its batch's records were sent."""

    async def run() -> tuple[list[int], list[list[HeldEvent]]]:
        first_may_finish = asyncio.Event()
        sent: list[int] = []
        made, held = batches_of(2)

        async def predict(queries: list[QueryEvent]) -> PredictedBatch:
            if batch_of(predicted(queries)) == 0:
                await first_may_finish.wait()
            else:
                first_may_finish.set()  # batch 1 predicted before batch 0
            return predicted(queries)

        async def send(prediction: PredictedBatch) -> None:
            batch = batch_of(prediction)
            assert not any(event.acked for event in made[batch]), "released before sent"
            sent.append(batch)

        await asyncio.wait_for(pipelined(held, decode, predict, send), DEADLINE_SECONDS)
        return sent, made

    sent, made = asyncio.run(run())
    assert sent == [0, 1]
    assert all(event.acked for batch in made for event in batch)


def test_a_failed_send_fails_the_stage_and_leaves_its_batch_unreleased() -> None:
    made, held = batches_of(3)

    async def predict(queries: list[QueryEvent]) -> PredictedBatch:
        return predicted(queries)

    async def send(prediction: PredictedBatch) -> None:
        if batch_of(prediction) == 1:
            raise RuntimeError("the broker refused the records")

    with pytest.raises(ExceptionGroup) as failure:
        asyncio.run(pipelined(held, decode, predict, send))
    assert failure.group_contains(RuntimeError, match="refused")
    assert [event.acked for event in made[0]] == [True, True]
    assert not any(event.acked for event in made[1] + made[2])


def test_no_more_than_two_batches_are_in_flight() -> None:
    """With batch 0's prediction stuck, the stage reads batch 1 and then waits: the
    predictor thread has one batch queued at most, and what the stage holds stays
    bounded."""

    async def run() -> list[int]:
        decoded: list[int] = []
        never = asyncio.Event()

        async def decode_and_note(events: Sequence[Any]) -> list[QueryEvent]:
            decoded.append(events[0].batch)
            return await decode(events)

        async def predict(queries: list[QueryEvent]) -> PredictedBatch:
            if batch_of(predicted(queries)) == 0:
                await never.wait()
            return predicted(queries)

        async def send(prediction: PredictedBatch) -> None:
            return None

        _, held = batches_of(10)
        stage = asyncio.create_task(pipelined(held, decode_and_note, predict, send))
        async with asyncio.timeout(DEADLINE_SECONDS):
            while len(decoded) < 2:
                await asyncio.sleep(0)
        for _ in range(100):  # every ready task runs; none may read another batch
            await asyncio.sleep(0)
        stage.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stage
        return decoded

    assert asyncio.run(run()) == [0, 1]


def test_a_batch_with_nothing_valid_is_released_after_the_batches_before_it() -> None:
    """Batch 1 has no valid query: nothing to send, but its events wait for batch 0's
    records, or their offsets could be committed before batch 0's."""

    async def run() -> list[list[HeldEvent]]:
        first_may_finish = asyncio.Event()
        made, held = batches_of(2)

        async def nothing_valid_in_batch_1(events: Sequence[Any]) -> list[QueryEvent]:
            if events[0].batch == 1:
                first_may_finish.set()
                return []
            return await decode(events)

        async def predict(queries: list[QueryEvent]) -> PredictedBatch:
            await first_may_finish.wait()
            for _ in range(10):  # batch 1's release would run now if it did not wait
                await asyncio.sleep(0)
            assert not any(event.acked for event in made[1]), "released before batch 0"
            return predicted(queries)

        async def send(prediction: PredictedBatch) -> None:
            return None

        await asyncio.wait_for(
            pipelined(held, nothing_valid_in_batch_1, predict, send), DEADLINE_SECONDS
        )
        return made

    made = asyncio.run(run())
    assert all(event.acked for batch in made for event in batch)


def test_a_failed_prediction_fails_the_stage_and_leaves_its_batch_unreleased() -> None:
    made, held = batches_of(3)

    async def predict(queries: list[QueryEvent]) -> PredictedBatch:
        if batch_of(predicted(queries)) == 1:
            raise ValueError("the predictor failed")
        return predicted(queries)

    async def send(prediction: PredictedBatch) -> None:
        return None

    with pytest.raises(ExceptionGroup) as failure:
        asyncio.run(pipelined(held, decode, predict, send))
    assert failure.group_contains(ValueError, match="predictor failed")
    # Batch 0 may or may not have been sent by then: a crash re-reads what is unreleased.
    assert not any(event.acked for event in made[1] + made[2])


def test_a_prediction_cancelled_on_its_own_fails_the_stage_instead_of_stalling_it() -> None:
    """As when the predictor's executor shuts down under it: awaited bare, the
    cancellation ended the sender quietly and the stage waited forever."""
    made, held = batches_of(4)

    async def predict(queries: list[QueryEvent]) -> PredictedBatch:
        if batch_of(predicted(queries)) == 1:
            raise asyncio.CancelledError
        return predicted(queries)

    async def send(prediction: PredictedBatch) -> None:
        return None

    async def run() -> None:
        await asyncio.wait_for(pipelined(held, decode, predict, send), DEADLINE_SECONDS)

    with pytest.raises(ExceptionGroup) as failure:
        asyncio.run(run())
    assert failure.group_contains(RuntimeError, match="cancelled")
    assert not any(event.acked for event in made[1] + made[2] + made[3])
