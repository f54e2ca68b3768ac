"""Per pool, what its windows have used up: production time billed so far (an
hourly budget pays each second once) and the exploration allowance carried.

Kept in a Faust table whose compacted changelog is partitioned like the pool's
omnirouter.predicted partition, so the router that takes the pool over after a
restart or a rebalance goes on from where the last one stood instead of billing
the same time again or exploring from nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from faust.types import TableT
from pydantic import BaseModel


class PoolAccount(BaseModel):
    billed_until: datetime | None = None
    exploration_carried_usd: float = 0.0


@dataclass
class PoolLedger:
    table: TableT

    def account(self, pool: str) -> PoolAccount:
        raw = self.table.data.get(pool.encode())
        if raw is None:
            return PoolAccount()
        try:
            return PoolAccount.model_validate_json(raw)
        except ValueError:  # an entry of an incompatible version: start the pool afresh
            return PoolAccount()

    @property
    def changelog(self) -> str:
        return str(self.table.changelog_topic.get_topic_name())

    def entry(self, pool: str, account: PoolAccount) -> tuple[bytes, bytes]:
        """(key, value) of the pool's account, as written to the changelog."""
        return pool.encode(), account.model_dump_json().encode()

    def remember(self, key: bytes, value: bytes) -> None:
        """Take an entry the publisher wrote to the changelog (workers/stream/publishers.py);
        losing the last one in a crash only re-bills that window's time once, when it
        is replayed."""
        self.table.data[key] = value
