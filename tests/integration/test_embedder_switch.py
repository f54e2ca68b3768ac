"""Switching ROUTER_EMBEDDER re-embeds the stored queries from their texts (real
PostgreSQL): the router's store never holds vectors of two embedders."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from workers.config import Settings
from workers.db.models import OutcomeRow
from workers.routing.dataset import load_routerbench, shipped_sample_path
from workers.routing.embedder import make_embedder
from workers.stream.replay import seed_outcomes
from workers.stream.router_state import RouterState

pytestmark = pytest.mark.integration

PROMPTS = 12


def stored_embedders(engine: sa.Engine) -> set[str | None]:
    with Session(engine) as session:
        return set(session.scalars(sa.select(OutcomeRow.embedder).distinct()))


def test_switching_the_embedder_re_embeds_the_store_from_the_stored_texts(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = sa.create_engine(postgres_url)
    sample = load_routerbench(shipped_sample_path()).take(list(range(PROMPTS)))
    settings = Settings(database_url=postgres_url)
    minilm = make_embedder("minilm", Path(settings.embedder_cache_dir))
    seed_outcomes(engine, sample, minilm)  # stored by a router that embedded with MiniLM
    assert stored_embedders(engine) == {minilm.name}

    static = make_embedder("static", Path(settings.embedder_cache_dir))
    state = RouterState(
        settings.model_copy(update={"router_embedder": "static"}), static, postgres_url
    )
    with caplog.at_level(logging.WARNING, logger="workers.stream.router_state"):
        asyncio.run(state.warm())

    store = state.predictor.store
    assert len(store) == PROMPTS and store.dimension == static.dimension
    expected = static.embed(list(sample.prompts))
    np.testing.assert_allclose(store.vectors, expected, atol=1e-6)
    assert stored_embedders(engine) == {static.name}  # the database re-embedded too
    assert f"re-embedded {PROMPTS} stored queries" in caplog.text
