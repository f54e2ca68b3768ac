"""What PostgreSQL text can hold: the one check the seed-file reader and the outcome
repository (through it, the query and outcome validators) share."""

from __future__ import annotations


def text_refusal(value: str) -> str | None:
    """Why PostgreSQL text cannot store `value`, or None if it can: a NUL character
    (text refuses it) or a lone surrogate (it has no UTF-8)."""
    if "\x00" in value:
        return "holds a NUL character, which PostgreSQL text cannot store"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate at character {exc.start}, which has no UTF-8"
    return None
