"""Event contracts shared by every producer and consumer of OmniRouter-stream."""

from schemas.events import (
    ALL_EVENTS,
    SCHEMA_VERSION,
    SCORE_SOURCE_RANK,
    Assignment,
    DeadLetter,
    ModelResponse,
    Outcome,
    PredictedQuery,
    QueryEvent,
    QueryHints,
    ScoreSource,
    WindowReport,
)

__all__ = [
    "ALL_EVENTS",
    "SCHEMA_VERSION",
    "SCORE_SOURCE_RANK",
    "Assignment",
    "DeadLetter",
    "ModelResponse",
    "Outcome",
    "PredictedQuery",
    "QueryEvent",
    "QueryHints",
    "ScoreSource",
    "WindowReport",
]
