"""Seeded sampling on the bundled model with its shipped heads: at temperature 0.8 and top_p 0.95,
for two held-out prompts and two seeds, early exit off, eager and deferred on 1 and 2 stages in
one process all give the tokens of plain seeded sampling (1 stage, early exit off). Two ranks:
tests/test_distributed.py; the full size (16 prompts x 128 tokens, seeds 0..3):
scripts/sampling_parity.py.

Eager equal to plain sampling is the rule (docs/design.md, invariant 4, with the noise keyed by
(seed, position)). Deferred equal to it is the CPU fp32 property that tests/test_early_exit.py
states for greedy decoding: merged chunks change the reduction order, and in fp32 on this CPU
they happen not to change a token; the test asserts that merged chunks really ran.

Speculative sampling is the same distribution, not the same samples: here it must be
deterministic for a seed and independent of the stage split (eager).
"""

from __future__ import annotations

import pytest
import torch
from adadecode.launcher.bench import first_divergence
from adadecode.runtime.engine import Engine
from adadecode.runtime.prompts import select_prompts
from adadecode.runtime.sampling import SamplingParams
from helpers import bundled_model_dir

pytestmark = pytest.mark.slow  # the bundled model, for many tokens

MAX_NEW_TOKENS = 32
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def engines():
    bundled_model_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores crawl
    # heads inside both stages of the 2-stage split (0-18, 19-29) at low thresholds, so that early tokens,
    # rollbacks and deferred merges all happen on each engine whatever the manifest's defaults are
    heads = {"exit_layers": (10, 19, 22, 25, 28), "thresholds": (0.5, 0.7, 0.3, 0.5, 0.6)}
    yield {p: Engine.load("bundled:smollm2-135m-instruct", stages=p, **heads) for p in (1, 2)}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(engines):
    return [engines[1].encode(p, chat=isinstance(p, list)) for p in select_prompts("data/prompts/heldout.jsonl", 2)]


def merged_chunks(engine: Engine) -> int:
    return sum(stage.stats.merged for stage in engine.stages)


def test_seeded_sampling_is_the_same_with_early_exit_and_across_stages(engines, prompts):
    early = rollbacks = 0
    merged = {p: merged_chunks(e) for p, e in engines.items()}
    for ids in prompts:
        for seed in SEEDS:
            params = SamplingParams(0.8, top_p=0.95, seed=seed)
            ref = None  # plain seeded sampling: 1 stage, early exit off, the first run
            for stages, engine in engines.items():
                for mode in ("off", "eager", "deferred"):
                    res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit=mode, sampling=params)
                    ref = res.tokens if ref is None else ref
                    at = first_divergence(res.tokens, ref)
                    assert at is None, f"seed {seed}, {stages} stages, {mode}: diverges at {at}"
                    early, rollbacks = early + res.stats["early_emitted"], rollbacks + res.stats["rollbacks"]
    assert early > 100 and rollbacks > 5  # the premises: early tokens flowed, and some were undone
    assert all(merged_chunks(e) > merged[p] for p, e in engines.items())  # and deferred really merged


def test_speculative_sampling_is_deterministic_for_a_seed(engines, prompts):
    params = SamplingParams(0.8, top_p=0.95, seed=3, mode="speculative")
    ids = prompts[0]
    first = engines[1].generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit="eager", sampling=params)
    assert first.stats["early_emitted"] > 5
    for engine in (engines[1], engines[2]):
        res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit="eager", sampling=params)
        assert res.tokens == first.tokens
