"""A model's generation_config.json as defaults (runtime/generation_config.py): its EOS ids end
generation, its sampling defaults fill the keys neither the YAML nor the command line set, as
transformers and vLLM apply them, and `--generation-config none` ignores it."""

from __future__ import annotations

import json

import pytest
from adadecode.launcher.cli import main, parse
from adadecode.launcher.config import ConfigError, load_config
from adadecode.runtime.generation_config import GenerationConfigError, read_generation_config
from helpers import save_char_tokenizer, save_tiny_model

QWEN3_LIKE = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [2, 7]}


def _write(path, **data):
    path.mkdir(parents=True, exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "data, sampling",
    [
        (QWEN3_LIKE, {"temperature": 0.6, "top_p": 0.95, "top_k": 20}),
        ({"do_sample": True, "top_k": 64, "top_p": 0.95}, {"temperature": 1.0, "top_k": 64, "top_p": 0.95}),  # Gemma 3
        ({"temperature": 0.7, "top_p": 0.8}, {}),  # no do_sample: transformers decodes greedily, so do we
        ({"do_sample": False, "temperature": 0.7}, {}),
        ({"bos_token_id": 1, "eos_token_id": 2}, {}),  # the bundled SmolLM2's
    ],
)
def test_sampling_defaults_apply_only_where_the_file_samples(tmp_path, data, sampling):
    assert read_generation_config(_write(tmp_path, **data)).sampling == sampling


def test_eos_ids_one_or_many_and_none_ignores_the_file(tmp_path):
    _write(tmp_path, **QWEN3_LIKE)
    assert read_generation_config(tmp_path).eos_token_ids == {2, 7}
    assert read_generation_config(tmp_path, "none").eos_token_ids == frozenset()
    assert read_generation_config(tmp_path, "none").sampling == {}
    other = _write(tmp_path / "other", eos_token_id=5)
    assert read_generation_config(tmp_path, str(other)).eos_token_ids == {5}  # vLLM's --generation-config DIR
    assert read_generation_config(tmp_path / "missing-model").path is None  # auto, and the model has none


@pytest.mark.parametrize(
    "data, setting, fragment",
    [
        ({"do_sample": True, "temperature": 0.001}, "auto", "sampling parameter temperature = 0.001"),
        ({"eos_token_id": "x"}, "auto", "eos_token_id 'x' is not a token id"),
        ({}, "/no/such/dir", "/no/such/dir/generation_config.json does not exist"),
    ],
)
def test_a_bad_generation_config_is_named_with_the_fix(tmp_path, data, setting, fragment):
    _write(tmp_path, **data)
    with pytest.raises(GenerationConfigError) as e:
        read_generation_config(tmp_path, setting)
    assert fragment in str(e.value) and "none" in str(e.value), str(e.value)


def test_unsupported_keys_are_listed(tmp_path):
    _write(tmp_path, do_sample=True, repetition_penalty=1.05, typical_p=1.0)
    assert read_generation_config(tmp_path).ignored == ("repetition_penalty=1.05",)


def test_the_model_layer_fills_only_keys_nobody_set(tmp_path):
    """Precedence: command line > YAML > the model's generation config > the schema's defaults."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("sampling:\n  top_p: 0.5\n")
    layer = ("the model's generation_config.json", {"sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}})
    cfg = load_config(["--config", str(yaml_file), "--sampling.top_k=3"], model_defaults=lambda cfg: layer)
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k) == (0.6, 0.5, 3)
    greedy = load_config(["--sampling.temperature=0"], model_defaults=lambda cfg: layer)
    assert greedy.sampling.temperature == 0.0  # an explicit greedy request stays greedy
    bad = ("the model's generation_config.json", {"sampling": {"top_k": 2.5}})
    with pytest.raises(ConfigError, match="sampling.top_k = 2.5.*set by the model's generation_config.json"):
        load_config([], model_defaults=lambda cfg: bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("gen") / "m", seed=5)
    save_char_tokenizer(path, 96)
    return path


def test_the_command_line_gets_the_models_sampling_defaults(tiny, tmp_path):
    gen = json.loads((tiny / "generation_config.json").read_text())
    (tiny / "generation_config.json").write_text(json.dumps({**gen, **QWEN3_LIKE}))
    try:
        base = ["generate", "--prompt", "x", "--model", str(tiny)]
        s = parse(base)[1].sampling
        assert (s.temperature, s.top_p, s.top_k) == (0.6, 0.95, 20)
        s = parse([*base, "--temperature", "0"])[1].sampling
        assert (s.temperature, s.top_p) == (0.0, 0.95)
        s = parse([*base, "--generation-config", "none"])[1].sampling
        assert (s.temperature, s.top_p, s.top_k) == (0.0, 1.0, 0)
        for command in (["bench"], ["serve"]):  # bench and serve parse the same way
            assert parse([*command, "--model", str(tiny)])[1].sampling.temperature == 0.6
    finally:
        (tiny / "generation_config.json").write_text(json.dumps(gen))


def test_generate_samples_with_the_models_defaults_and_stops_at_its_eos(tiny, capsys):
    """End to end through the launch path: the tokens greedy decoding gives, then one of them made
    an EOS id by the generation config alone ends generation there; with a sampling config the
    run samples at its temperature; `none` ignores both."""
    gen_file = tiny / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    base = [
        "generate",
        "--prompt",
        "abcab",
        "--model",
        str(tiny),
        "--max-new-tokens",
        "10",
        "--json",
        "--decoding.heads=none",
        "--model.max_seq_len=64",
    ]

    def run(*flags):
        assert main([*base, *flags]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    plain = run()
    assert plain["finish_reason"] == "length" and plain["stats"]["sampling"] is None
    tokens = plain["tokens"]
    at = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i] and tokens[i] != 2)
    try:
        gen_file.write_text(json.dumps({**gen, "eos_token_id": [2, tokens[at]]}))
        stopped = run()
        assert stopped["tokens"] == tokens[: at + 1] and stopped["finish_reason"] == "eos"
        assert run("--generation-config", "none")["tokens"] == tokens
        gen_file.write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.7}))
        sampled = run("--seed", "3")
        assert sampled["stats"]["sampling"]["temperature"] == 0.7
    finally:
        gen_file.write_text(json.dumps(gen))
