"""Claims about the real SmolLM2: the fast replay evaluator applies to it and agrees with the engine."""

from __future__ import annotations

import pytest
from numerics import assert_close

from reftkit.analysis.patching import LogitDifference, activation_patching

pytestmark = pytest.mark.numerics  # compared with references: rerun under a second CPU code path

KEEP_THREADS = True  # the real model is large enough for torch's default threads


@pytest.mark.real_model
def test_smollm2_replay_matches_engine(smollm2):
    model, tokenizer = smollm2
    clean = "The Eiffel Tower is located in the city of"
    corrupted = "The Colosseum is located in the city of"
    metric = LogitDifference(" Paris", " Rome", tokenizer=tokenizer)
    kwargs = dict(tokenizer=tokenizer, components=("block_output", "mlp_output"), layers=[4, 20], positions=[3, 9])
    fast = activation_patching(model, clean, corrupted, metric, method="replay", **kwargs)
    slow = activation_patching(model, clean, corrupted, metric, method="engine", **kwargs)
    assert fast.clean[0] > 0 > fast.corrupted[0]  # the model prefers Paris for the tower, Rome for the Colosseum
    assert_close(fast.effects, slow.effects)
