"""Output parity on the real bundled model: the runtime's tokens equal transformers' greedy
`generate` with 1, 2 and 3 stages, in float32 and in bfloat16 (the dtype GPU users get; this
CPU computes it natively), with early exit off and `eager` (scripts/parity.py runs the full
versions: 18 x 128 in float32, 16 x 128 in bfloat16)."""

from __future__ import annotations

import pytest
import torch
from adadecode.launcher.bench import first_divergence, hf_generate
from adadecode.runtime.engine import Engine
from adadecode.runtime.model_source import SUPPORTED_MODEL_TYPES
from adadecode.runtime.prompts import select_prompts
from helpers import InProcessPipeline, bundled_model_dir, hf_greedy, save_tiny_model

NUM_PROMPTS = 6  # one per category: code, prose, chat, math, list, qa
MAX_NEW_TOKENS = 40
BF16_PROMPTS = 3  # code, prose, chat: bf16 runs at about the speed of fp32 here


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    path = bundled_model_dir()
    engine = Engine.load("bundled:smollm2-135m-instruct", stages=1)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    eos = sorted(engine.eos_token_ids)
    cases = []
    for prompt in select_prompts("data/prompts/heldout.jsonl", NUM_PROMPTS):
        ids = engine.encode(prompt, chat=isinstance(prompt, list))
        cases.append((ids, hf_generate(hf, ids, MAX_NEW_TOKENS, eos)[0]))
    return engine, cases


@pytest.mark.slow  # the bundled model, for many tokens
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_tokens_equal_transformers_generate(reference, stages):
    engine, cases = reference
    if stages != 1:
        engine = Engine.load("bundled:smollm2-135m-instruct", stages=stages)
    assert len(engine.stages) == stages
    for ids, ref in cases:
        ours = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS).tokens
        at = first_divergence(ours, ref)
        assert at is None, f"{stages} stages: diverges at token {at}: {ours[at:at + 3]} vs {ref[at:at + 3]}"


@pytest.mark.slow  # the bundled model, for many tokens
def test_eos_and_length_stops(reference):
    engine, cases = reference
    for ids, ref in cases:
        res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS)
        if ref[-1] in engine.eos_token_ids:
            assert res.finish_reason == "eos" and res.tokens[-1] == ref[-1]
        else:
            assert res.finish_reason == "length" and len(res.tokens) == MAX_NEW_TOKENS
    short = engine.generate(cases[0][0], max_new_tokens=1)
    assert short.tokens == cases[0][1][:1] and short.finish_reason in ("length", "eos")


@pytest.mark.slow  # the bundled model, for many tokens
def test_stop_string_ends_generation_and_is_not_output(reference):
    engine, _ = reference
    full = engine.generate("List three colours:\n1.", max_new_tokens=30)
    assert "2." in full.text, full.text  # the premise: the model numbers its list
    res = engine.generate("List three colours:\n1.", max_new_tokens=30, stop=["2."])
    assert res.finish_reason == "stop"
    assert "2." not in res.text and full.text.startswith(res.text)
    assert res.tokens == full.tokens[: len(res.tokens)]


@pytest.mark.slow  # the bundled model, for many tokens
def test_streamed_text_equals_the_result(reference):
    engine, cases = reference
    chunks: list[str] = []
    res = engine.generate(cases[2][0], max_new_tokens=MAX_NEW_TOKENS, on_text=chunks.append)
    assert "".join(chunks) == res.text and len(chunks) > 1


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3_text"]  # SUPPORTED_MODEL_TYPES
SPLITS = ([(0, 6)], [(0, 3), (3, 6)], [(0, 1), (1, 4), (4, 6)])
TINY_HEAD_LAYERS = [1, 2, 3, 4, 5]  # every inner layer: heads inside stages and at every boundary


def test_the_families_checked_here_are_the_supported_ones():
    assert sorted(FAMILIES) == sorted(SUPPORTED_MODEL_TYPES)


# beyond each family's tiny default (helpers.TINY_FAMILY): Phi-3-mini's full rotary, and experts on
# every other layer with top-k weights as the softmax gives them
VARIANTS = [("phi3", {"partial_rotary_factor": 1.0}),
            ("qwen3_moe", {"norm_topk_prob": False, "decoder_sparse_step": 2, "mlp_only_layers": []}),
            # Gemma 2's final logit softcap (no released Gemma 3 sets one) on the final layer and the heads,
            # and the tied LM head every Gemma has
            ("gemma3_text", {"final_logit_softcapping": 5.0, "tie_word_embeddings": True})]


@pytest.mark.parametrize("model_type,overrides", [(f, {}) for f in FAMILIES] + VARIANTS, ids=str)
def test_every_architecture_matches_generate_on_any_split(tmp_path, model_type, overrides):
    """Tiny random models of each family: plain decoding, and early exit with heads that are
    confident often and mostly wrong (eager and deferred backfill, many rollbacks), give
    transformers' greedy tokens on 1, 2 and 3 stages. For deferred, equality is the CPU fp32
    property (tests/test_early_exit.py), not a rule."""
    path = save_tiny_model(tmp_path, model_type, seed=3, **overrides)
    prompt = [5, 17, 33, 2, 9, 41, 7]
    ref = hf_greedy(path, prompt, 24)
    if model_type == "gemma3_text":  # the premise: the window of 4 (shorter than the prompt) changes the tokens
        wide = save_tiny_model(tmp_path / "wide", model_type, seed=3, **overrides, sliding_window=64)
        assert hf_greedy(wide, prompt, 24) != ref
    for ranges in SPLITS:
        pipe = InProcessPipeline(path, ranges)
        assert pipe.generate(prompt, 24) == ref, (model_type, ranges)
        pipe.set_random_heads(TINY_HEAD_LAYERS)
        for mode in ("eager", "deferred"):
            assert pipe.generate(prompt, 16, early_exit=mode) == ref[:16], (model_type, ranges, mode)
            stats = pipe.last_stats
            assert stats.early_emitted > 0 and stats.rollbacks > 0, (model_type, ranges, mode, stats)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_layer_equals_transformers_hidden_states(tmp_path, model_type):
    """Layer by layer, stage by stage: each layer's output over a prompt is bit-identical to
    transformers' own forward (``output_hidden_states``) of the model it loads itself, which
    also checks that a stage's tensors (Phi-3's fused ones, Qwen3-MoE's per-expert ones
    stacked at load time) are put where transformers puts them."""
    from transformers import AutoModelForCausalLM

    cap = {"final_logit_softcapping": 1.5} if model_type == "gemma3_text" else {}  # a cap that bites
    path = save_tiny_model(tmp_path, model_type, seed=4, **cap)
    prompt = [5, 17, 33, 2, 9, 41, 7, 60, 3]
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf(torch.tensor([prompt]), output_hidden_states=True)
    theirs = [h[0] for h in out.hidden_states]  # the embedding, then after each layer (the last normed)
    pipe = InProcessPipeline(path, SPLITS[2])
    hidden = pipe.stages[0].model.embed(prompt)
    assert torch.equal(hidden, theirs[0])
    for stage in pipe.stages:
        model = stage.model
        for layer in range(model.start, model.end):
            hidden = model.run_layers(hidden, 0, layer, layer + 1)
            if layer + 1 < len(theirs) - 1:
                assert torch.equal(hidden, theirs[layer + 1]), f"{model_type}: layer {layer}"
    assert torch.equal(pipe.stages[-1].model.modules.norm(hidden), theirs[-1])
    assert torch.equal(pipe.stages[-1].model.logits(hidden, alone=False), out.logits[0])  # a prefill's one call
    if cap:  # the premise: capped logits, and a cap that changes them
        last = pipe.stages[-1].model.modules
        assert out.logits.abs().max() < 1.5 < last.lm_head(last.norm(hidden)).abs().max()


@pytest.fixture(scope="module")
def bf16_cases():
    """transformers' greedy generate with the weights loaded in bfloat16, on the CPU."""
    from transformers import AutoModelForCausalLM

    path = bundled_model_dir()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    engine = Engine.load("bundled:smollm2-135m-instruct", device="cpu", dtype="bfloat16", heads=None)
    eos = sorted(engine.eos_token_ids)
    cases = []
    for prompt in select_prompts("data/prompts/heldout.jsonl", BF16_PROMPTS):
        ids = engine.encode(prompt, chat=isinstance(prompt, list))
        cases.append((ids, hf_generate(hf, ids, MAX_NEW_TOKENS, eos)[0]))
    return cases


@pytest.mark.slow  # the bundled model, for many tokens
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_bf16_off_and_eager_equal_transformers_generate_in_bf16(bf16_cases, stages):
    engine = Engine.load(
        "bundled:smollm2-135m-instruct", stages=stages, device="cpu", dtype="bfloat16", compile="off",
        exit_layers=[19, 22, 25, 28], thresholds=[0.5],
    )
    assert engine.stages[0].model.dtype is torch.bfloat16
    early = 0
    for ids, ref in bf16_cases:
        for mode in ("off", "eager"):
            res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit=mode)
            at = first_divergence(res.tokens, ref)
            assert at is None, (
                f"bf16, {stages} stages, {mode}: diverges at {at}: {res.tokens[at:at + 3]} vs {ref[at:at + 3]}"
            )
            early += res.stats["early_emitted"]
    assert early > 0  # the premise: early tokens were emitted (and some rolled back)
