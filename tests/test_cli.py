"""The `adadecode` command, called in-process: outputs, JSON records and error messages."""

from __future__ import annotations

import json

import pytest
from adadecode.launcher.cli import main
from helpers import bundled_model_dir, tiny_config


@pytest.fixture(scope="module", autouse=True)
def _bundled():
    bundled_model_dir()  # skip the module without the bundled model; convert it once otherwise


def test_generate_streams_text_and_reports_speed(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "tokens/s" in err


def test_generate_json_over_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "def add(a, b):"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi."}]}) + "\n"
    )
    argv = ["generate", "--prompts", str(prompts), "--json", "--max-new-tokens", "5", "--stages", "2"]
    assert main([*argv, "--transport.backend=inprocess"]) == 0  # ranks of their own: tests/test_distributed.py
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2
    for r in records:
        assert {"prompt_tokens", "tokens", "text", "tokens_per_s", "stats", "finish_reason"} <= r.keys()
        assert 1 <= len(r["tokens"]) <= 5
        assert r["stats"]["stages"] == [[0, 19], [19, 30]]
    assert records[1]["prompt_tokens"] > 10  # the chat template was applied to the messages


def test_print_config_shows_overrides(capsys):
    assert main(["generate", "--print-config", "--stages", "3", "--model.max_seq_len=512"]) == 0
    out = capsys.readouterr().out
    assert "stages: 3" in out and "max_seq_len: 512" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "x", "--pipline.stages=2"], "did you mean `--pipeline.stages`"),
        (["generate"], "--prompt TEXT, or --prompts FILE"),
        (["generate", "--prompt", "x", "--early-exit", "eager", "--decoding.heads=none"], "needs exit heads"),
        (["generate", "--prompt", "x", "--decoding.heads=/no/such/heads"], "no manifest.json"),
        (["generate", "--prompt", "x", "--model", "/no/such/model"], "does not exist"),
        (["generate", "--prompt", "x", "--stages", "31"], "31"),
        (["generate", "--prompt", "word " * 40, "--model.max_seq_len=32", "--max-new-tokens", "8"], "max_seq_len"),
    ],
)
def test_bad_input_gets_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("adadecode: error:") and message in err, err


def test_bad_prompts_file_names_the_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    assert main(["generate", "--prompts", str(prompts)]) == 2
    assert "p.jsonl:2" in capsys.readouterr().err


def test_unknown_architecture_is_refused_by_name(tmp_path, capsys):
    tiny_config("gpt2", n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", "--prompt", "x", "--model", str(tmp_path)]) == 2
    assert "gpt2" in capsys.readouterr().err
