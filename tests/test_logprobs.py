"""Log probabilities, the prompt's log probabilities and penalties on the real bundled model.

Log probabilities are of the final layer's raw distribution (runtime/sampling.py), verified like
every token: in fp32 on this CPU they are identical, bit for bit, with early exit off, eager and
deferred on 1 and 2 stages, under untrained heads that exit at every chance (most early tokens are
rolled back) and with deferred chunks merged. Deferred's identity rests on the row-invariant
merged chunks (runtime/row_invariant.py): with ``row_invariant`` off a merged chunk's one multi-row
matmul rounds differently, and the log probabilities after the first merge differed in the last
bits (about 1e-6 relative, tokens unchanged), as invariant 4 says it may. The values themselves
match transformers' ``log_softmax`` of its logits. Penalties (vLLM's) keep the tokens independent
of early exit and the stage count, greedy and seeded, and greedy with ``repetition_penalty``
equals transformers' ``generate`` with its repetition penalty.
"""

from __future__ import annotations

import pytest
import torch
from adadecode.runtime.engine import Engine
from adadecode.runtime.sampling import SamplingParams, apply_penalties
from helpers import bundled_model_dir
from test_early_exit import boundary_layers, merged_chunks, untrained_heads, with_heads

pytestmark = pytest.mark.slow  # the bundled model

PROMPT = "The capital of France is"
MODES = ("off", "eager", "deferred")


@pytest.fixture(scope="module")
def engines():
    bundled_model_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for p in (1, 2):
        e = Engine.load("bundled:smollm2-135m-instruct", stages=p, heads=None)
        out[p] = with_heads(e, untrained_heads(e, boundary_layers(e) if p > 1 else [10, 20], threshold=0.0))
    yield out
    torch.set_num_threads(threads)


def run_everywhere(engines, params: SamplingParams, max_new_tokens: int = 10) -> dict:
    """Every (stages, mode): the result; and asserts the premise: rollbacks and merged chunks ran."""
    results = {}
    for p, engine in engines.items():
        for mode in MODES:
            merged = merged_chunks(engine)
            r = engine.generate(PROMPT, max_new_tokens=max_new_tokens, early_exit=mode, sampling=params)
            results[p, mode] = r
            if mode != "off":
                assert r.stats["rollbacks"] > 0, (p, mode)
            if mode == "deferred":
                assert merged_chunks(engine) > merged, p
    return results


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_identical_whatever_the_early_exit_mode_and_stage_count(engines, temperature):
    params = SamplingParams(temperature, seed=7, logprobs=3, prompt_logprobs=2)
    results = run_everywhere(engines, params)
    ref = results[1, "off"]
    assert len(ref.logprobs) == len(ref.tokens) and [lp.token for lp in ref.logprobs] == ref.tokens
    assert len(ref.prompt_logprobs) == ref.prompt_tokens - 1 and all(len(lp.top) == 2 for lp in ref.prompt_logprobs)
    for key, r in results.items():
        assert (r.tokens, r.logprobs, r.prompt_logprobs) == (ref.tokens, ref.logprobs, ref.prompt_logprobs), key
    if temperature == 0.0:  # greedy: each token is its distribution's top one; and the tokens are plain greedy's
        assert all(lp.top[0] == (lp.token, lp.logprob) for lp in ref.logprobs)
        assert engines[1].generate(PROMPT, max_new_tokens=10).tokens == ref.tokens


def test_logprobs_are_transformers_log_softmax(engines):
    from transformers import AutoModelForCausalLM

    engine = engines[1]
    r = engine.generate(PROMPT, max_new_tokens=6, sampling=SamplingParams(logprobs=2, prompt_logprobs=2))
    hf = AutoModelForCausalLM.from_pretrained(str(engine.resolved.path), dtype=torch.float32).eval()
    ids = engine.encode(PROMPT) + r.tokens
    with torch.no_grad():
        lp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    got = [x.logprob for x in r.prompt_logprobs + r.logprobs]
    assert got == pytest.approx(expected, abs=1e-4)
    top = lp[len(ids) - 2].topk(2)
    assert [i for i, _ in r.logprobs[-1].top] == top.indices.tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_penalties_keep_tokens_independent_of_early_exit_and_stages(engines, temperature):
    params = SamplingParams(temperature, seed=3, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    results = run_everywhere(engines, params, max_new_tokens=16)
    ref = results[1, "off"]
    assert all(r.tokens == ref.tokens for r in results.values())
    plain = engines[1].generate(PROMPT, max_new_tokens=16, sampling=SamplingParams(temperature, seed=3))
    assert plain.tokens != ref.tokens  # the penalties changed something


def test_greedy_repetition_penalty_equals_transformers(engines):
    from transformers import AutoModelForCausalLM

    engine = engines[2]
    r = engine.generate(PROMPT, max_new_tokens=16, early_exit="eager", sampling=SamplingParams(repetition_penalty=1.5))
    hf = AutoModelForCausalLM.from_pretrained(str(engine.resolved.path), dtype=torch.float32).eval()
    ids = engine.encode(PROMPT)
    out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=16,
        do_sample=False,
        repetition_penalty=1.5,
        eos_token_id=sorted(engine.eos_token_ids),
        pad_token_id=0,
    )
    assert r.tokens == out[0, len(ids) :].tolist()


def test_apply_penalties_follows_vllm():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # prompt: token 0; output: token 1 twice, token 3 once
    got = apply_penalties(logits, params, [0], [1, 3, 1])
    assert got.tolist() == [1.0, -2.0 - 0.5 - 0.5, 0.5, 1.5 - 0.5 - 0.25]


def test_generate_takes_ignore_eos_and_min_tokens(engines):
    engine = engines[1]
    plain = engine.generate(PROMPT, max_new_tokens=40)
    assert plain.finish_reason == "eos" and len(plain.tokens) < 40
    r = engine.generate(PROMPT, max_new_tokens=len(plain.tokens) + 3, ignore_eos=True)
    assert r.finish_reason == "length" and r.tokens[: len(plain.tokens)] == plain.tokens
    r = engine.generate(PROMPT, max_new_tokens=len(plain.tokens) + 3, min_tokens=len(plain.tokens) + 1)
    assert r.tokens[: len(plain.tokens)] == plain.tokens and len(r.tokens) > len(plain.tokens)
