"""The HF adapter: our layer call equals transformers' own, bit for bit; loading reads only a stage."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from adadecode.runtime.hf_adapter import (
    causal_chunk_mask,
    decoder_layer_forward,
    load_hf_config,
    load_stage_modules,
    rope_tables,
    sliding_window_keys,
)
from adadecode.runtime.kv_cache import KVCache
from adadecode.runtime.model_source import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError
from helpers import save_tiny_model, tiny_config

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "qwen3_moe", "gemma3_text"]
# a different architecture, and families near supported ones (a shared expert; Gemma 2's softcapped attention)
FAMILIES_NOT_SUPPORTED = ["gpt2", "qwen2_moe", "gemma2"]


class _HFCacheShim:
    """What transformers' attention calls: ``update(k, v, layer_idx, ...)`` on our cache."""

    def __init__(self, cache: KVCache, pos: int):
        self.cache, self.pos = cache, pos

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.cache.update(layer_idx, 0, self.pos, k, v)


# Phi-3 with a longrope RoPE (Phi-3.5 / Phi-4-mini), within its original context (check_rope_length)
LONGROPE = {"original_max_position_embeddings": 64, "rope_parameters": {
    "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [4.0] * 6}}
LAYER_CASES = [(arch, torch.float32, {}) for arch in ARCHS] + [
    (arch, torch.bfloat16, {}) for arch in ARCHS  # the dtype GPU users get (this CPU has AVX512-BF16)
] + [
    ("llama", torch.float32, {"mlp_bias": True, "attention_bias": True}),
    ("phi3", torch.float32, {"partial_rotary_factor": 1.0}),  # Phi-3-mini: full rotary
    ("phi3", torch.float32, LONGROPE),
    # top-k weights as the softmax gives them, not renormalised; layer 0 dense, layer 1 experts
    ("qwen3_moe", torch.float32, {"norm_topk_prob": False, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    # Gemma 3 with a global layer first, and a linear-scaled global RoPE (Gemma 3 4B and up)
    ("gemma3_text", torch.float32, {"layer_types": ["full_attention", "sliding_attention"] * 3, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
]


def _premise(model_type, mods, config):
    """What the case is there to exercise is really in the modules it runs."""
    hd = mods.layers[0].self_attn.head_dim
    if model_type == "phi3":
        rotary_dim = 2 * mods.rotary.inv_freq.shape[0]
        factor = config.rope_parameters["partial_rotary_factor"]
        assert rotary_dim == int(hd * factor) and (rotary_dim < hd) == (factor < 1)
    if model_type == "qwen3_moe":  # one dense MLP and one mixture of experts among the two layers
        kinds = sorted(type(layer.mlp).__name__ for layer in mods.layers)
        assert kinds == ["Qwen3MoeMLP", "Qwen3MoeSparseMoeBlock"], kinds
    if model_type == "gemma3_text":  # a local and a global layer, each with its own RoPE base
        assert sorted(config.layer_types[:2]) == ["full_attention", "sliding_attention"]
        assert mods.layers[0].rope_slice != mods.layers[1].rope_slice
        assert mods.layers[0].self_attn.scaling != mods.layers[0].self_attn.head_dim ** -0.5


@pytest.mark.parametrize("model_type,dtype,overrides", LAYER_CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_layer_forward_is_bit_identical_to_the_hf_module(tmp_path, model_type, dtype, overrides):
    if model_type == "gemma3_text":  # windows wider than these chunks (windows: test_a_local_layer_*, test_parity)
        overrides = {"sliding_window": 64, **overrides}
    path = save_tiny_model(tmp_path, model_type, seed=1, **overrides)
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 0, 2, embed=True, head=True, dtype=dtype)
    if overrides.get("mlp_bias"):  # the premise: the biases are there and not zero
        assert mods.layers[0].mlp.down_proj.bias.abs().sum() > 0
    _premise(model_type, mods, config)
    hd = mods.layers[0].self_attn.head_dim
    kv = config.num_key_value_heads
    ours, theirs = KVCache(), KVCache()
    for c in (ours, theirs):
        c.setup(2, 1, kv, 32, hd, dtype)
    cos_table, sin_table = rope_tables(mods.rotary, 32, dtype)
    torch.manual_seed(0)
    # a prefill of 5, a chunk of 3 appended (explicit mask), then a single token
    for pos, length in [(0, 5), (5, 3), (8, 1)]:
        hidden = torch.randn(1, length, config.hidden_size, dtype=dtype)
        positions = torch.arange(pos, pos + length)[None]
        mask = causal_chunk_mask(pos, length)
        rows = slice(pos, pos + length)
        for li, layer in enumerate(mods.layers):
            kind = [config.layer_types[li]] if model_type == "gemma3_text" else []  # Gemma: a rotation per kind
            cos, sin = mods.rotary(hidden, positions, *kind)
            a = decoder_layer_forward(
                layer,
                hidden,
                cos_table[rows][None, :, None],
                sin_table[rows][None, :, None],
                lambda k, v, li=li, pos=pos: ours.update(li, 0, pos, k, v),
                mask,
            )
            b = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=_HFCacheShim(theirs, pos))
            b = b[0] if isinstance(b, tuple) else b
            assert torch.equal(a, b), f"{model_type} layer {li} chunk at {pos}x{length}"
            hidden = a


def test_chunk_mask_shapes():
    assert causal_chunk_mask(0, 5) is None  # SDPA's causal flag is exact from position 0
    assert causal_chunk_mask(7, 1) is None
    m = causal_chunk_mask(4, 3)
    assert m.shape == (1, 1, 3, 7)
    assert m[0, 0].tolist() == [
        [True] * 5 + [False] * 2,
        [True] * 6 + [False],
        [True] * 7,
    ]


def test_stage_loads_only_its_range(tmp_path):
    path = save_tiny_model(tmp_path, "llama")
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 2, 4, embed=False, head=False)
    assert mods.embed is None and mods.norm is None and mods.lm_head is None
    assert len(mods.layers) == 2
    for p in mods.layers.parameters():
        assert p.device.type == "cpu"  # nothing left on meta
    first = load_stage_modules(path, config, 0, 1, embed=True, head=False)
    assert first.embed is not None and first.lm_head is None


def test_experts_stacked_from_shards_equal_transformers_own_loading(tmp_path):
    """Qwen3-MoE checkpoints hold one matrix per expert, here spread over several shards; a stage
    stacks its layers' experts as transformers does when it loads the whole model."""
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path, "qwen3_moe")
    AutoModelForCausalLM.from_pretrained(str(path)).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    sharded = tmp_path / "sharded"
    shards = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {f for n, f in shards.items() if n.startswith("model.layers.3.mlp.experts.")}
    assert len(experts) > 1  # the premise: one layer's experts lie in more than one file
    mods = load_stage_modules(sharded, load_hf_config(sharded), 3, 5, embed=False, head=False)
    theirs = AutoModelForCausalLM.from_pretrained(str(path)).model.layers
    for i, layer in enumerate(mods.layers):
        ref = dict(theirs[3 + i].named_parameters())
        ours = dict(layer.named_parameters())
        assert sorted(ours) == sorted(ref)
        for name, p in ours.items():
            assert torch.equal(p, ref[name]), f"layer {3 + i}: {name}"


def test_tied_lm_head_reuses_the_embedding(tmp_path):
    path = save_tiny_model(tmp_path, "llama", tie_word_embeddings=True)
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 0, 6, embed=True, head=True)
    assert mods.lm_head.weight.data_ptr() == mods.embed.weight.data_ptr()


@pytest.mark.parametrize("model_type", FAMILIES_NOT_SUPPORTED)
def test_unsupported_architecture_is_named_before_any_weight_is_read(tmp_path, model_type):
    config = tiny_config("gpt2", n_layer=2, n_embd=32, n_head=2) if model_type == "gpt2" else tiny_config(model_type)
    config.save_pretrained(tmp_path)  # no weights at all
    with pytest.raises(UnsupportedArchitectureError) as e:
        load_hf_config(tmp_path)
    assert f"`{model_type}`" in str(e.value) and ", ".join(SUPPORTED_MODEL_TYPES) in str(e.value)


@pytest.mark.parametrize("model_type", ARCHS)
def test_a_stage_reads_only_its_own_layers_tensors(tmp_path, model_type, monkeypatch):
    """Invariant 5 per family: the middle stage [2, 4) opens only tensors of layers 2 and 3
    (Qwen3-MoE: its layers' experts, one matrix per expert, and nothing of another layer)."""
    import safetensors

    path = save_tiny_model(tmp_path, model_type)
    config = load_hf_config(path)
    read: list[str] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    mods = load_stage_modules(path, config, 2, 4, embed=False, head=False)
    assert read and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in read), read
    assert len(read) == len(set(read))
    with real_open(str(path / "model.safetensors"), framework="pt") as f:
        expected = [n for n in f.keys() if n.startswith(("model.layers.2.", "model.layers.3."))]
    assert sorted(read) == sorted(expected)
    for p in mods.layers.parameters():
        assert p.device.type == "cpu"  # nothing left on meta


def test_a_longrope_table_beyond_the_original_context_is_refused(tmp_path):
    path = save_tiny_model(tmp_path, "phi3", **LONGROPE)
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 0, 1, embed=True, head=False)
    rope_tables(mods.rotary, 64, torch.float32)  # within: the short factors, as transformers uses them
    with pytest.raises(ValueError, match="max_seq_len 65 exceeds 64, the original context.*<= 64"):
        rope_tables(mods.rotary, 65, torch.float32)


_PEAK_RSS = textwrap.dedent(
    r"""
    import json, re, sys
    from adadecode.runtime.hf_adapter import load_hf_config, load_stage_modules

    def status(key):
        return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

    path, a, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = load_hf_config(path)
    load_stage_modules(path, config, 0, 0, embed=False, head=False)  # imports and meta skeleton: not weights
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    mods = load_stage_modules(path, config, a, b, embed=a == 0, head=b == config.num_hidden_layers)
    print(json.dumps({"delta_kib": status("VmHWM") - before}))
    """
)


def _peak_rss_kib(path, a, b) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(path), str(a), str(b)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_kib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_peak_memory_follows_the_layer_range(tmp_path):
    # 8 layers of ~12.6 MB each (fp32), small vocab: the layers dominate the file.
    path = save_tiny_model(
        tmp_path, "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, vocab_size=64,
    )
    layer_mib = (4 * 512 * 512 + 3 * 512 * 1536) * 4 / 2**20
    one = _peak_rss_kib(path, 1, 2) / 1024
    full = _peak_rss_kib(path, 0, 8) / 1024
    assert full > 6 * layer_mib
    print(f"peak: one layer {one:.0f} MiB, all {full:.0f} MiB, a layer's weights {layer_mib:.0f} MiB")
    assert one < 2.5 * layer_mib, f"one layer took {one:.0f} MiB of peak memory, the model {full:.0f} MiB"


@pytest.mark.parametrize("input_pos,rows", [(0, 3), (0, 4), (0, 9), (2, 1), (3, 1), (7, 1), (5, 3), (9, 2)])
def test_a_local_layer_sees_the_window_transformers_gives_it(input_pos, rows):
    """``sliding_window_keys`` (window 4) against transformers' own rules: the keys its sliding
    cache hands the layer (``DynamicSlidingWindowLayer``: the last window - 1 positions and the
    chunk; everything for a chunk from position 0), its mask function (``q - k < window``, causal)
    and when it skips the mask for SDPA (``_ignore_causal_mask_sdpa``)."""
    from transformers.masking_utils import _ignore_causal_mask_sdpa, sliding_window_causal_mask_function

    window, end = 4, input_pos + rows
    k_all = torch.arange(end, dtype=torch.float32).view(1, 1, end, 1)  # each key holds its position
    k, v, mask = sliding_window_keys(k_all, k_all.clone(), rows, window)
    begin = 0 if input_pos == 0 else max(0, input_pos - (window - 1))
    assert k[0, 0, :, 0].tolist() == list(range(begin, end)) and torch.equal(k, v)
    skip = _ignore_causal_mask_sdpa(None, rows, end - begin, input_pos, begin, local_attention_size=window)
    assert (mask is None) == skip
    if mask is not None:
        fn = sliding_window_causal_mask_function(window)
        t = torch.tensor
        theirs = [[bool(fn(t(0), t(0), t(q), t(kv))) for kv in range(begin, end)] for q in range(input_pos, end)]
        assert mask[0, 0].tolist() == theirs


def test_gemma_layers_carry_their_window_and_the_embedding_its_scale(tmp_path):
    path = save_tiny_model(tmp_path, "gemma3_text")
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 0, 6, embed=True, head=True)
    assert [layer.sliding_window for layer in mods.layers] == [4, None, 4, 4, None, 4]
    assert not mods.embed.embed_scale.is_meta and float(mods.embed.embed_scale) == 8.0  # sqrt(hidden)


def test_gemma_exit_heads_score_with_its_final_norm_and_softcap(tmp_path):
    """Heads saved for a Gemma 3 model and loaded as a rank loads them: an identity head at a
    layer gives exactly the final layer's logits (Gemma's (1 + w) final norm, the tied LM head
    and the logit softcap) on the same hidden state, so its confidence is the model's own."""
    from adadecode.runtime.exit_heads import load_exit_heads
    from adadecode.runtime.hf_adapter import ModelArgs
    from adadecode.runtime.model_runner import StageModel
    from adadecode.runtime.model_source import resolve_model
    from helpers import save_identity_heads

    path = save_tiny_model(tmp_path / "m", "gemma3_text", final_logit_softcapping=1.5, tie_word_embeddings=True)
    heads_dir = save_identity_heads(path, tmp_path / "heads", {3: 0.5})
    config = load_hf_config(path)
    mods = load_stage_modules(path, config, 0, 6, embed=True, head=True)
    mods.norm.weight.data.normal_(0, 0.5)  # a final norm whose (1 + w) shows
    heads = load_exit_heads(heads_dir, fingerprint=resolve_model(str(path)).fingerprint, config=config,
                            norm=mods.norm, lm_head_weight=mods.lm_head.weight)
    model = StageModel(mods, ModelArgs.from_hf_config(config), 32)
    hidden = model.run_layers(model.embed([5, 17, 33, 2]), 0, 0, 3)[-1:]
    final = model.logits(hidden)[0]
    assert final.abs().max() < 1.5 and heads.logit_softcap == 1.5
    assert torch.equal(heads._logits(3, hidden[0]), final)
    token, confidence = heads.predict(3, hidden[0])
    assert token == int(final.argmax()) and confidence == pytest.approx(float(final.softmax(-1).max()))
