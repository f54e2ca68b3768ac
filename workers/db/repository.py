"""Outcome repository: the only code that reads or writes the outcomes table."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from schemas import SCORE_SOURCE_RANK, Outcome
from workers.db.models import OutcomeRow
from workers.routing.cascade_fit import AnsweredOutcome
from workers.routing.store import OutcomeRecord
from workers.routing.text_checks import text_refusal


def create_engine(database_url: str) -> sa.Engine:
    return sa.create_engine(database_url, pool_pre_ping=True)


# Columns an event leaves as they are when it says nothing (None) about them.
_KEEP_IF_NONE = ("embedding", "embedder", "query_text", "judge_cost_usd")
# Of those, the one whose change the outcome writer counts: not the vector (the
# writer makes it again) nor the query's text (a query's text does not change).
_COUNTED_COLUMNS = ("judge_cost_usd",)


# One attempt's result, its answer's excerpt or its error, replaced together
# (`_takes_attempt`): a model asked again (a cascade escalation after its failed
# probe) is stored with its answer, not with the first error.
_ATTEMPT_COLUMNS = ("error", "response_excerpt")
# The attempt's usage: taken with it, each column kept where the attempt leaves it
# None; an error that loses to a stored answer leaves the answer's usage.
_USAGE_COLUMNS = ("input_tokens", "output_tokens", "cost_usd", "latency_ms")


# What a score replaces together (`_takes_score`).
_SCORE_COLUMNS = ("quality_score", "score_source", "scored_at")


# Event field -> the outcomes column that stores it as it is.
_COLUMN_OF_FIELD = {
    "query_id": "query_id",
    "model": "model",
    "pool": "pool",
    "quality_score": "quality_score",
    "score_source": "score_source",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cost_usd": "cost_usd",
    "latency_ms": "latency_ms",
    "error": "error",
    "text": "query_text",
    "judge_cost_usd": "judge_cost_usd",
    "response": "response_excerpt",
}
# Bits of PostgreSQL's signed integer types; the most specific SQLAlchemy type first.
_INTEGER_BITS: tuple[tuple[type[sa.Integer], int], ...] = (
    (sa.SmallInteger, 16),
    (sa.BigInteger, 64),
    (sa.Integer, 32),
)


def _row(outcome: Outcome, embedding: np.ndarray | None, embedder: str | None) -> dict[str, Any]:
    return {
        **{column: getattr(outcome, field) for field, column in _COLUMN_OF_FIELD.items()},
        "embedding": None if embedding is None else np.asarray(embedding, np.float32).tobytes(),
        "embedder": None if embedding is None else embedder,
        # In UTC: SQLite (the demo's fallback) keeps no zone, so times compare as written.
        "scored_at": None if outcome.quality_score is None else outcome.created_at.astimezone(UTC),
    }


def unstorable_reason(outcome: Outcome) -> str | None:
    """Why the outcomes table cannot hold this outcome, naming the field, or None.

    PostgreSQL refuses such a value (DataError) and with it the whole batch's
    statement, so the writer dead-letters the outcome before writing."""
    return unstorable_fields({field: getattr(outcome, field) for field in _COLUMN_OF_FIELD})


def unstorable_fields(values: Mapping[str, object]) -> str | None:
    """Why the outcomes table cannot hold these values of Outcome's fields (field ->
    value), naming the first such field, or None; the limits are read from the
    columns' types. The one check of both the outcome writer and the router, which
    refuses a query whose outcome could never be stored (its query_id, text, pool)."""
    columns = OutcomeRow.__table__.c
    for field, value in values.items():
        column = _COLUMN_OF_FIELD[field]
        refusal = _column_refusal(columns[column].type, value)
        if refusal is not None:
            return f"{field} ({column} column): {refusal}"
    return None


def _column_refusal(column_type: sa.types.TypeEngine[Any], value: object) -> str | None:
    if isinstance(value, str):
        return _text_refusal(value, getattr(column_type, "length", None))
    if isinstance(value, int) and isinstance(column_type, sa.Integer):
        bits = next(b for kind, b in _INTEGER_BITS if isinstance(column_type, kind))
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if not low <= value <= high:
            return f"outside the {bits}-bit integer range [{low}, {high}]"
    return None


def _text_refusal(value: str, max_length: int | None) -> str | None:
    if max_length is not None and len(value) > max_length:
        return f"{len(value)} characters, more than the column's {max_length}"
    return text_refusal(value)


def _takes_score(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether the new row's score replaces the old one's: it comes from a stronger
    source, or from the same one and is not older (a score without a time counts as
    the oldest). The upsert's `takes_score` is the same rule in SQL."""
    if new["quality_score"] is None:
        return False
    new_rank = SCORE_SOURCE_RANK.get(new["score_source"] or "", 0)
    old_rank = SCORE_SOURCE_RANK.get(old["score_source"] or "", 0)
    if new_rank != old_rank:
        return new_rank > old_rank
    return old["scored_at"] is None or (
        new["scored_at"] is not None and new["scored_at"] >= old["scored_at"]
    )


def _takes_attempt(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """Whether the new row's attempt replaces the old one's: an answer replaces
    anything, an error only where no answer is stored (a failed re-send after a
    crash must not hide the answer that was delivered and judged); a row that
    reports no attempt (a score) replaces none. `_takes_attempt_sql` is the same
    rule in SQL."""
    if new["error"] is None:
        return _reports_attempt(new)
    return not _is_answer(old)


def _reports_attempt(row: Mapping[str, Any]) -> bool:
    """Whether the row reports a call of its model: an error, an excerpt or usage.
    Not the excerpt alone: it is None with OUTCOME_RESPONSE_MAX_CHARS=0, for an
    empty reply, and from Outcome v1/v2 producers."""
    return any(row[c] is not None for c in (*_ATTEMPT_COLUMNS, *_USAGE_COLUMNS))


def _is_answer(row: Mapping[str, Any]) -> bool:
    return row["error"] is None and _reports_attempt(row)


def _takes_attempt_sql(
    new: sa.ColumnCollection[str, Any], old: sa.ColumnCollection[str, Any]
) -> sa.ColumnElement[bool]:
    """`_takes_attempt` in SQL, of the row written (`new`) and the stored one (`old`)."""
    return sa.or_(
        sa.and_(new.error.is_(None), _reports_attempt_sql(new)),
        sa.and_(new.error.is_not(None), sa.not_(_is_answer_sql(old))),
    )


def _reports_attempt_sql(row: sa.ColumnCollection[str, Any]) -> sa.ColumnElement[bool]:
    return sa.or_(*(row[c].is_not(None) for c in (*_ATTEMPT_COLUMNS, *_USAGE_COLUMNS)))


def _is_answer_sql(row: sa.ColumnCollection[str, Any]) -> sa.ColumnElement[bool]:
    return sa.and_(row.error.is_(None), _reports_attempt_sql(row))


class Change(NamedTuple):
    """What an event changes of the stored row of its (query_id, model)."""

    row: bool  # anything: the event inserts the row or changes a column of it
    attempt: bool  # its attempt (error, excerpt, usage) is taken: its spend counts
    score: bool  # its score is taken: its score counts


def merge_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (query_id, model), merged in order as the upsert merges into a
    stored row (`_merge_into`), the pool being the first event's. (ON CONFLICT may
    not touch a row twice in one statement, so a batch is merged here first; usage
    with the text followed by a judge's score in the same batch keeps both.)"""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["query_id"], row["model"])
        if key not in merged:
            merged[key] = dict(row)
        else:
            _merge_into(merged[key], row, _KEEP_IF_NONE)
    return list(merged.values())


def _merge_into(kept: dict[str, Any], row: Mapping[str, Any], columns: Sequence[str]) -> Change:
    """Merge `row` into `kept` as the upsert does: a field of `columns` the row leaves
    None keeps the earlier value; an attempt replaces an earlier one as
    `_takes_attempt` says, with its usage (where it has some); a score as
    `_takes_score` says. What changed."""
    changed = False
    for column in columns:
        if row[column] is not None and row[column] != kept[column]:
            kept[column] = row[column]
            changed = True
    attempt = _takes_attempt(row, kept) and _replace(
        kept,
        {c: row[c] for c in _ATTEMPT_COLUMNS}
        | {c: kept[c] if row[c] is None else row[c] for c in _USAGE_COLUMNS},
    )
    score = _takes_score(row, kept) and _replace(kept, {c: row[c] for c in _SCORE_COLUMNS})
    return Change(changed or attempt or score, attempt, score)


def _replace(kept: dict[str, Any], values: Mapping[str, Any]) -> bool:
    """Put `values` into `kept`; whether that changed it."""
    if all(kept[c] == v for c, v in values.items()):
        return False
    kept.update(values)
    return True


def changing_rows(
    rows: Iterable[Mapping[str, Any]], stored: Mapping[tuple[str, str], Mapping[str, Any]]
) -> list[Change]:
    """What each row, in order, changes of what is stored of its (query_id, model):
    `stored` (the stored rows' counted columns, attempt and score, by key) with the
    rows before it merged in. Nothing for an outcome already recorded (a batch read
    again after a restart or a hand-over): the outcome writer counts only changes."""
    known = {key: dict(columns) for key, columns in stored.items()}
    changes = []
    for row in rows:
        key = (row["query_id"], row["model"])
        if key in known:
            changes.append(_merge_into(known[key], row, _COUNTED_COLUMNS))
        else:
            known[key] = dict(row)
            changes.append(Change(True, _reports_attempt(row), row["quality_score"] is not None))
    return changes


def changing_outcomes(
    session: Session, outcomes: Sequence[Outcome]
) -> list[tuple[Outcome, Change]]:
    """The outcomes whose write changes the table, with what it changes
    (`changing_rows`), to be written in the same transaction. Their keys stay locked
    until it ends (`_lock_keys`), stored or not: a writer of the same keys at once (a
    partition's old owner retrying its batch) waits, then reads them as written.

    An excerpt is compared only by whether there is one ("" stands for any): an
    attempt tells itself apart by its error and usage, so the excerpts (up to
    OUTCOME_RESPONSE_MAX_CHARS each) are not read back, nor the query's text."""
    keys = list(dict.fromkeys((o.query_id, o.model) for o in outcomes))
    if not keys:
        return []
    _lock_keys(session, keys)
    table = OutcomeRow.__table__
    names = ("query_id", "model", *_COUNTED_COLUMNS, "error", *_USAGE_COLUMNS, *_SCORE_COLUMNS)
    excerpt = sa.case((table.c.response_excerpt.is_not(None), ""))
    query = (
        sa.select(*(table.c[c] for c in names), excerpt.label("response_excerpt"))
        .where(sa.tuple_(table.c.query_id, table.c.model).in_(keys))
        .order_by(table.c.id)
        .with_for_update()
    )
    stored = {(r.query_id, r.model): _in_utc(dict(r._mapping)) for r in session.execute(query)}
    rows = [
        _row(o, None, None) | {"response_excerpt": None if o.response is None else ""}
        for o in outcomes
    ]
    changes = changing_rows(rows, stored)
    return [(o, change) for o, change in zip(outcomes, changes, strict=True) if change.row]


def _lock_keys(session: Session, keys: Sequence[tuple[str, str]]) -> None:
    """Lock each (query_id, model) until the transaction ends, whether a row of it is
    stored or not: SELECT ... FOR UPDATE locks only stored rows, so two writers of
    the same new outcome would both see none and both count it. One statement, in
    ascending order of the lock ids, so writers of overlapping batches cannot
    deadlock (PostgreSQL evaluates a volatile function of the select list after
    ORDER BY's sort since 9.6: EXPLAIN VERBOSE shows the lock in a Result above the
    Sort). SQLite (the demo's single-process fallback) has one writer: nothing."""
    if session.get_bind().dialect.name != "postgresql":
        return
    ids = sorted({_lock_id(query_id, model) for query_id, model in keys})
    lock_id = sa.func.unnest(
        sa.bindparam("lock_ids", ids, type_=postgresql.ARRAY(sa.BigInteger))
    ).column_valued("lock_id")
    session.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_id)).order_by(lock_id)).all()


def _lock_id(query_id: str, model: str) -> int:
    """A stable signed 64-bit advisory lock id of a (query_id, model): the same in
    every process (Python's hash() is salted per process). JSON keeps the pair
    unambiguous and encodes any string, a lone surrogate too. Two keys sharing an
    id only wait for each other."""
    key = json.dumps([query_id, model]).encode("ascii")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big", signed=True)


def _in_utc(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored row's score time as an event's: SQLite (the demo's fallback) gives it
    back without its zone, UTC as written."""
    scored_at = stored["scored_at"]
    if scored_at is not None and scored_at.tzinfo is None:
        stored["scored_at"] = scored_at.replace(tzinfo=UTC)
    return stored


def upsert_outcomes(
    session: Session,
    outcomes: Sequence[Outcome],
    embeddings: Sequence[np.ndarray | None],
    embedder: str | None = None,
) -> None:
    """Insert outcomes, or merge them into the row of the same (query_id, model).

    A field that the newer event leaves None keeps its stored value, so a late
    quality score does not erase the usage recorded earlier, and vice versa; an
    answer replaces the stored attempt, an error only one without an answer, each
    with its usage (`_takes_attempt`); a score replaces the stored one if its
    source ranks higher (user > replay > judge), so a judge never overrides a
    user's feedback, or if its source is the same and it is not older (by the
    outcome's `created_at`, stored as `scored_at`), so a retried batch written late
    never puts a user's first score back over their second.
    A vector is stored with the name of the `embedder` that made it (required).
    """
    if not outcomes:
        return
    if embedder is None and any(e is not None for e in embeddings):
        raise ValueError("vectors must be stored with the name of the embedder that made them")
    rows = merge_rows(_row(o, e, embedder) for o, e in zip(outcomes, embeddings, strict=True))
    statement: postgresql.Insert | sqlite.Insert
    if session.get_bind().dialect.name == "postgresql":
        statement = postgresql.insert(OutcomeRow)
    else:
        statement = sqlite.insert(OutcomeRow)
    table = OutcomeRow.__table__
    new, old = statement.excluded, table.c
    new_rank, old_rank = _source_rank(new.score_source), _source_rank(old.score_source)
    takes_attempt = _takes_attempt_sql(new, old)
    takes_score = sa.and_(  # _takes_score
        new.quality_score.is_not(None),
        sa.or_(
            new_rank > old_rank,
            sa.and_(
                new_rank == old_rank,
                sa.or_(old.scored_at.is_(None), new.scored_at >= old.scored_at),
            ),
        ),
    )
    statement = statement.on_conflict_do_update(
        index_elements=["query_id", "model"],
        set_={
            **{c: sa.func.coalesce(new[c], old[c]) for c in _KEEP_IF_NONE},
            **{c: sa.case((takes_attempt, new[c]), else_=old[c]) for c in _ATTEMPT_COLUMNS},
            **{
                c: sa.case((takes_attempt, sa.func.coalesce(new[c], old[c])), else_=old[c])
                for c in _USAGE_COLUMNS
            },
            **{c: sa.case((takes_score, new[c]), else_=old[c]) for c in _SCORE_COLUMNS},
            "updated_at": sa.func.now(),
        },
    )
    # A list of rows: SQLAlchemy batches them into multi-row statements that stay
    # under the database's limit on bound parameters (65,535 for PostgreSQL).
    session.execute(statement, rows)


def _source_rank(column: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    return sa.case(SCORE_SOURCE_RANK, value=column, else_=0)


def iter_outcomes(
    session: Session, updated_since: datetime | None = None, batch_size: int = 5000
) -> Iterator[tuple[OutcomeRecord, datetime]]:
    """Stored outcomes (changed after `updated_since`, if given), oldest change
    first, each with the time it last changed; streamed in batches."""
    query = sa.select(
        OutcomeRow.query_id,
        OutcomeRow.model,
        OutcomeRow.quality_score,
        OutcomeRow.cost_usd,
        OutcomeRow.output_tokens,
        OutcomeRow.embedding,
        OutcomeRow.embedder,
        OutcomeRow.query_text,
        OutcomeRow.updated_at,
    ).order_by(OutcomeRow.updated_at, OutcomeRow.id)
    if updated_since is not None:
        query = query.where(OutcomeRow.updated_at > updated_since)
    for row in session.execute(query.execution_options(yield_per=batch_size)):
        record = OutcomeRecord(
            query_id=row.query_id,
            model=row.model,
            quality_score=row.quality_score,
            cost_usd=row.cost_usd,
            output_tokens=row.output_tokens,
            embedding=None if row.embedding is None else np.frombuffer(row.embedding, np.float32),
            embedder=row.embedder,
            text=row.query_text,
        )
        yield record, row.updated_at


def count_outcomes(session: Session, models: Iterable[str] | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(OutcomeRow)
    if models is not None:
        query = query.where(OutcomeRow.model.in_(list(models)))
    return int(session.execute(query).scalar_one())


def stored_models(session: Session, query_ids: Iterable[str]) -> dict[str, set[str]]:
    """The models with a stored outcome of each of these queries (a query with
    none is left out)."""
    wanted = list(query_ids)
    if not wanted:
        return {}
    query = sa.select(OutcomeRow.query_id, OutcomeRow.model).where(OutcomeRow.query_id.in_(wanted))
    models: dict[str, set[str]] = {}
    for query_id, model in session.execute(query):
        models.setdefault(query_id, set()).add(model)
    return models


def texts_of_other_embedders(session: Session, embedder: str, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (query_id, text) of stored queries whose vector another embedder
    made (or that have a text and no vector): what switching to `embedder` re-embeds."""
    query = (
        sa.select(OutcomeRow.query_id, sa.func.min(OutcomeRow.query_text))
        .where(
            OutcomeRow.query_text.is_not(None),
            OutcomeRow.embedder.is_distinct_from(embedder),
        )
        .group_by(OutcomeRow.query_id)
        .order_by(OutcomeRow.query_id)
        .limit(limit)
    )
    return [(query_id, str(text)) for query_id, text in session.execute(query)]


def replace_vectors(
    session: Session, query_ids: Sequence[str], vectors: np.ndarray, embedder: str
) -> None:
    """Every stored row of each query gets its new vector and the embedder's name."""
    if not query_ids:
        return
    table = cast(sa.Table, OutcomeRow.__table__)
    statement = (
        sa.update(table)
        .where(table.c.query_id == sa.bindparam("qid"))
        .values(embedding=sa.bindparam("vector"), embedder=embedder, updated_at=sa.func.now())
    )
    rows = [
        {"qid": q, "vector": np.asarray(v, np.float32).tobytes()}
        for q, v in zip(query_ids, vectors, strict=True)
    ]
    session.connection().execute(statement, rows)


def scored_answers(session: Session, models: Sequence[str], limit: int) -> list[AnsweredOutcome]:
    """The newest `limit` scored outcomes of `models`, with their answers' excerpts
    (None where none was stored) and their queries' vectors: what a cascade pool's
    answer scorer learns from (workers/routing/cascade_fit.py)."""
    query = (
        sa.select(
            OutcomeRow.query_id,
            OutcomeRow.model,
            OutcomeRow.quality_score,
            OutcomeRow.cost_usd,
            OutcomeRow.response_excerpt,
            OutcomeRow.embedding,
            OutcomeRow.embedder,
            OutcomeRow.query_text,
        )
        .where(OutcomeRow.model.in_(list(models)), OutcomeRow.quality_score.is_not(None))
        .order_by(OutcomeRow.updated_at.desc(), OutcomeRow.id.desc())
        .limit(limit)
    )
    return [
        AnsweredOutcome(
            query_id=row.query_id,
            model=row.model,
            quality_score=row.quality_score,
            cost_usd=row.cost_usd,
            response=row.response_excerpt,
            embedding=None if row.embedding is None else np.frombuffer(row.embedding, np.float32),
            embedder=row.embedder,
            text=row.query_text,
        )
        for row in session.execute(query)
    ]
