"""The KV cache: explicit-position writes, length-move rollback, and chunked compute.

The first half drives ``KVCache`` with hand-made tensors; the second runs a real
tiny ``StageModel`` and checks invariants 1 and 2 of docs/design.md: a chunk at
any position sees exactly what plain decoding would, and after any
accept/rollback sequence the cache below the write pointer equals a from-scratch
prefill of the same tokens.
"""

from __future__ import annotations

import random

import pytest
import torch
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.kv_cache import CacheOverflowError, KVCache
from adadecode.runtime.model_runner import StageModel

LAYERS, SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM = 3, 2, 2, 16, 4


def make_cache(**kw) -> KVCache:
    cache = KVCache()
    shape = dict(num_layers=LAYERS, num_slots=SLOTS, kv_heads=KV_HEADS, max_len=MAX_LEN, head_dim=HEAD_DIM)
    cache.setup(**{**shape, **kw})
    return cache


def kv(length: int, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v: [1, kv_heads, length, head_dim]."""
    if fill is not None:
        k = torch.full((1, KV_HEADS, length, HEAD_DIM), fill)
        return k, -k
    return torch.randn(1, KV_HEADS, length, HEAD_DIM), torch.randn(1, KV_HEADS, length, HEAD_DIM)


def all_lengths(cache: KVCache) -> list[list[int]]:
    return [[cache.length(layer, slot) for slot in range(SLOTS)] for layer in range(LAYERS)]


# --- KVCache alone -----------------------------------------------------------------------------


def test_setup_allocates_zero_length_buffers():
    cache = make_cache()
    assert cache.num_slots == SLOTS and cache.max_len == MAX_LEN
    assert len(cache.k) == len(cache.v) == LAYERS
    assert cache.k[0].shape == (SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM)
    assert all_lengths(cache) == [[0, 0]] * LAYERS


def test_setup_twice_keeps_the_buffers_and_resets_lengths():
    cache = make_cache()
    cache.update(0, 0, 0, *kv(5))
    cache.update(2, 1, 0, *kv(3))
    k0, v0 = cache.k[0], cache.v[0]
    cache.setup(LAYERS, SLOTS, KV_HEADS, MAX_LEN, HEAD_DIM)
    assert cache.k[0] is k0 and cache.v[0] is v0  # no reallocation
    assert all_lengths(cache) == [[0, 0]] * LAYERS
    cache.update(0, 0, 0, *kv(2))  # usable again from position 0
    assert cache.length(0, 0) == 2


def test_setup_with_another_shape_reallocates():
    cache = make_cache()
    cache.update(0, 0, 0, *kv(5))
    cache.setup(LAYERS + 1, SLOTS, KV_HEADS, MAX_LEN * 2, HEAD_DIM)
    assert len(cache.k) == LAYERS + 1 and cache.max_len == MAX_LEN * 2
    assert cache.k[0].shape == (SLOTS, KV_HEADS, MAX_LEN * 2, HEAD_DIM)
    assert cache.length(0, 0) == 0


def test_update_appends_at_the_valid_length_and_returns_the_valid_prefix():
    cache = make_cache()
    k1, v1 = kv(5)
    k_all, v_all = cache.update(1, 0, 0, k1, v1)
    assert k_all.shape == v_all.shape == (1, KV_HEADS, 5, HEAD_DIM)
    assert torch.equal(k_all, k1) and torch.equal(v_all, v1)
    k2, v2 = kv(3)
    k_all, v_all = cache.update(1, 0, 5, k2, v2)
    assert k_all.shape == (1, KV_HEADS, 8, HEAD_DIM)
    assert torch.equal(k_all, torch.cat([k1, k2], dim=2))
    assert torch.equal(v_all, torch.cat([v1, v2], dim=2))
    assert cache.length(1, 0) == 8
    assert cache.length(0, 0) == cache.length(2, 0) == 0  # per layer
    assert cache.length(1, 1) == 0  # per slot


@pytest.mark.parametrize("pos", [1, 4, 6])
def test_writing_anywhere_but_the_valid_length_raises(pos):
    cache = make_cache()
    cache.update(0, 0, 0, *kv(5))
    before = cache.k[0].clone()
    with pytest.raises(RuntimeError, match=f"position {pos}.*holds 5"):
        cache.update(0, 0, pos, *kv(1))
    assert cache.length(0, 0) == 5
    assert torch.equal(cache.k[0], before)


def test_first_write_must_start_at_zero():
    cache = make_cache()
    with pytest.raises(RuntimeError, match="holds 0"):
        cache.update(0, 0, 3, *kv(1))


@pytest.mark.parametrize("first, second", [(MAX_LEN, 1), (MAX_LEN - 2, 3), (0, MAX_LEN + 1)])
def test_overflow_raises_naming_max_seq_len(first, second):
    cache = make_cache()
    if first:
        cache.update(0, 0, 0, *kv(first))
    with pytest.raises(CacheOverflowError, match="max_seq_len") as exc:
        cache.update(0, 0, first, *kv(second))
    assert f"needs {first + second} positions" in str(exc.value)
    assert f"holds {MAX_LEN}" in str(exc.value)
    assert cache.length(0, 0) == first


def test_filling_the_cache_exactly_is_fine():
    cache = make_cache()
    cache.update(0, 0, 0, *kv(MAX_LEN - 1))
    k_all, _ = cache.update(0, 0, MAX_LEN - 1, *kv(1))
    assert k_all.shape[2] == MAX_LEN


def test_truncate_moves_every_layer_back_and_never_forward():
    cache = make_cache()
    for layer, n in enumerate((6, 4, 2)):
        cache.update(layer, 0, 0, *kv(n))
    cache.truncate(0, 3)
    assert [cache.length(layer, 0) for layer in range(LAYERS)] == [3, 3, 2]
    cache.truncate(0, 10)  # a truncate never extends
    assert [cache.length(layer, 0) for layer in range(LAYERS)] == [3, 3, 2]


def test_truncate_then_append_overwrites_the_stale_entries():
    cache = make_cache()
    cache.update(0, 0, 0, *kv(4, fill=1.0))
    cache.update(0, 0, 4, *kv(3, fill=2.0))  # in-flight tokens, later rejected
    cache.truncate(0, 4)
    k_all, v_all = cache.update(0, 0, 4, *kv(2, fill=3.0))
    assert k_all.shape[2] == 6
    expected = torch.tensor([1.0] * 4 + [3.0] * 2)
    assert torch.equal(k_all[0, 0, :, 0], expected)
    assert torch.equal(v_all[0, 0, :, 0], -expected)
    assert not (k_all == 2.0).any()  # nothing stale is visible


def test_slots_are_independent():
    cache = make_cache()
    a, b = kv(5), kv(3)
    cache.update(0, 0, 0, *a)
    cache.update(0, 1, 0, *b)
    cache.update(0, 1, 3, *kv(2))
    cache.truncate(1, 1)  # rolling back slot 1 leaves slot 0 alone
    assert cache.length(0, 0) == 5 and cache.length(0, 1) == 1
    assert torch.equal(cache.k[0][0:1, :, :5], a[0])
    k_all, _ = cache.update(0, 0, 5, *kv(1))
    assert torch.equal(k_all[:, :, :5], a[0])
    assert torch.equal(cache.k[0][1:2, :, :1], b[0][:, :, :1])
    cache.reset(1)
    assert cache.length(0, 0) == 6 and cache.length(0, 1) == 0
    cache.reset()
    assert all_lengths(cache) == [[0, 0]] * LAYERS


# --- with a real tiny StageModel --------------------------------------------------------------

TOKENS = [5, 17, 3, 42, 8, 61, 2, 30, 11]
TINY_MODEL_SEED = 3  # the weights of conftest.model_dir


@pytest.fixture(scope="module")
def modules(model_dir):
    config = load_hf_config(model_dir)
    mods = load_stage_modules(model_dir, config, 0, config.num_hidden_layers, embed=True, head=True)
    return mods, ModelArgs.from_hf_config(config)


def stage_model(modules, num_slots: int = 1) -> StageModel:
    mods, args = modules
    return StageModel(mods, args, max_seq_len=32, num_slots=num_slots)


def run_chunks(model: StageModel, tokens: list[int], chunks, start: int = 0, slot: int = 0) -> torch.Tensor:
    """Run ``tokens`` from position ``start`` in chunks of the given sizes. Returns [S, D]."""
    assert sum(chunks) == len(tokens)
    out, pos = [], start
    for n in chunks:
        x = model.embed(torch.tensor(tokens[pos - start : pos - start + n]))
        out.append(model.run_layers(x, pos, model.start, model.end, slot))
        pos += n
    return torch.cat(out)


def valid_prefix(model: StageModel, slot: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cache = model.cache
    result = []
    for layer in range(len(cache.k)):
        n = cache.length(layer, slot)
        result.append((cache.k[layer][slot, :, :n], cache.v[layer][slot, :, :n]))
    return result


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    # chunk shapes change the floating-point reduction order (docs/design.md, invariant 4), so
    # differently chunked runs agree to float32 rounding, not bit for bit (hidden states
    # here reach ~10, so 1e-4 is a few ulps of the largest entries)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", [(5, 3, 1), (1,) * 9, (2, 7), (4, 4, 1), (8, 1)])
def test_chunks_give_the_hidden_states_of_one_prefill(modules, chunks):
    whole = run_chunks(stage_model(modules), TOKENS, [len(TOKENS)])
    model = stage_model(modules)
    chunked = run_chunks(model, TOKENS, chunks)
    assert_close(chunked, whole)
    assert torch.equal(model.logits(chunked).argmax(-1), model.logits(whole).argmax(-1))
    assert [model.cache_length(layer) for layer in range(model.start, model.end)] == [len(TOKENS)] * 6


def test_one_prefill_matches_transformers(model_dir, modules):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf(torch.tensor([TOKENS])).logits[0]
    model = stage_model(modules)
    logits = model.logits(run_chunks(model, TOKENS, (5, 3, 1)))
    assert_close(logits, expected)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_chunks_run_on_a_sub_range_of_layers(modules):
    """``run_layers`` on ``[first, last)`` then ``[last, end)`` equals one call over all layers."""
    whole = stage_model(modules)
    ref = run_chunks(whole, TOKENS[:5], [5])
    split = stage_model(modules)
    x = split.embed(torch.tensor(TOKENS[:5]))
    h = split.run_layers(x, 0, 0, 2)
    assert [split.cache_length(layer) for layer in range(6)] == [5, 5, 0, 0, 0, 0]
    h = split.run_layers(h, 0, 2, 6)
    assert torch.equal(h, ref)


def test_truncate_then_append_equals_a_prefill_of_the_same_tokens(modules):
    accepted = TOKENS[:6]
    rejected, corrected = [50, 51, 52], [70, 71]
    model = stage_model(modules)
    run_chunks(model, accepted + rejected, (5, 1, 1, 1, 1))
    model.truncate(0, len(accepted))
    assert [model.cache_length(layer) for layer in range(6)] == [6] * 6
    out = run_chunks(model, corrected, (1, 1), start=len(accepted))

    same_chunks = stage_model(modules)  # the same chunk shapes: bit-identical (invariant 4)
    ref = run_chunks(same_chunks, accepted + corrected, (5, 1, 1, 1))
    assert torch.equal(out, ref[-2:])
    for (k, v), (k_ref, v_ref) in zip(valid_prefix(model), valid_prefix(same_chunks)):
        assert k.shape[1] == 8
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)

    one_prefill = stage_model(modules)  # one chunk: equal to rounding
    ref = run_chunks(one_prefill, accepted + corrected, [8])
    assert_close(out, ref[-2:])
    for (k, v), (k_ref, v_ref) in zip(valid_prefix(model), valid_prefix(one_prefill)):
        assert_close(k, k_ref)
        assert_close(v, v_ref)


@pytest.mark.parametrize("seed", range(6))
def test_after_any_accept_rollback_sequence_the_cache_equals_a_prefill(modules, seed):
    rng = random.Random(seed)
    model = stage_model(modules, num_slots=2)
    slot = seed % 2
    tokens = [rng.randrange(96) for _ in range(rng.randint(1, 5))]
    run_chunks(model, tokens, [len(tokens)], slot=slot)
    for _ in range(8):
        if rng.random() < 0.35 and len(tokens) > 1:  # reject: roll back part of what ran
            keep = rng.randint(1, len(tokens) - 1)
            model.truncate(slot, keep)
            del tokens[keep:]
        new = [rng.randrange(96) for _ in range(rng.randint(1, 3))]
        if len(tokens) + len(new) > model.max_seq_len:
            break
        run_chunks(model, new, [len(new)], start=len(tokens), slot=slot)
        tokens += new

    ref = stage_model(modules)
    run_chunks(ref, tokens, [len(tokens)])
    for (k, v), (k_ref, v_ref) in zip(valid_prefix(model, slot), valid_prefix(ref)):
        assert k.shape[1] == len(tokens)
        assert_close(k, k_ref)
        assert_close(v, v_ref)
    assert valid_prefix(model, 1 - slot)[0][0].shape[1] == 0  # the other slot untouched
