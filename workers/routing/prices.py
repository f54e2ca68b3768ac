"""List prices fitted to recorded costs: what a user states in ROUTER_MODEL_PRICES.

The demo and the cold-start benchmark start from an empty store, where the
router knows nothing but prices; RouterBench files record each answer's cost,
not the models' prices, so the prices are fitted to those costs.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls

from workers.config import ModelPrice
from workers.routing.dataset import OutcomeTable
from workers.routing.predictor import CHARS_PER_TOKEN


def fitted_prices(table: OutcomeTable) -> dict[str, ModelPrice]:
    """Each model's price per million prompt and answer tokens (characters / 4),
    fitted to its recorded costs by non-negative least squares."""
    prompt_tokens = np.array([len(p) / CHARS_PER_TOKEN for p in table.prompts])
    prices = {}
    for j, model in enumerate(table.models):
        answers = [len(r.get(model) or "") / CHARS_PER_TOKEN for r in table.responses]
        known = ~np.isnan(table.costs[:, j])
        design = np.column_stack([prompt_tokens, answers])[known] / 1e6
        (per_input, per_output), _ = nnls(design, table.costs[known, j])
        prices[model] = ModelPrice(input_per_mtok_usd=per_input, output_per_mtok_usd=per_output)
    return prices
