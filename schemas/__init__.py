"""Event contracts shared by every producer and consumer of OmniRouter-stream."""

from schemas.events import (
    ALL_EVENTS,
    FINAL_ROLES,
    SCHEMA_VERSION,
    SCORE_SOURCE_RANK,
    Assignment,
    AssignmentRole,
    DeadLetter,
    ModelResponse,
    Outcome,
    PredictedBatch,
    PredictedQuery,
    QueryEvent,
    QueryHints,
    ScoreSource,
    WindowReport,
)

__all__ = [
    "ALL_EVENTS",
    "FINAL_ROLES",
    "SCHEMA_VERSION",
    "SCORE_SOURCE_RANK",
    "Assignment",
    "AssignmentRole",
    "DeadLetter",
    "ModelResponse",
    "Outcome",
    "PredictedBatch",
    "PredictedQuery",
    "QueryEvent",
    "QueryHints",
    "ScoreSource",
    "WindowReport",
]
