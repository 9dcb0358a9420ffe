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


@pytest.mark.parametrize("argv, compiled", [
    (["serve"], "on"),
    (["bench"], "on"),
    (["serve", "--pipeline.compile=off"], "off"),
    (["bench", "--pipeline.compile=off"], "off"),
    (["generate", "--prompt", "x"], "auto"),  # the runtime compiles `auto` on CUDA only
])
def test_serve_and_bench_compile_by_default_and_generate_on_cuda_only(monkeypatch, argv, compiled):
    """`auto` is on for the long runs, `serve` and `bench` (what every rank they spawn re-parses too),
    and left to the device for one `generate` call; an explicit setting always stands."""
    seen = []
    monkeypatch.setattr("adadecode.launcher.launch.launch",
                        lambda cfg, *args, **kwargs: seen.append(cfg.pipeline.compile) or 0)
    assert main(argv) == 0
    assert seen == [compiled]


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


# --- exit statuses: user errors in one line, bugs with their traceback --------------------------


def _raiser(exc):
    def cmd(*args, **kwargs):
        raise exc

    return cmd


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (ValueError("bad value `x`; use y"), 2, "adadecode: error: bad value `x`; use y"),
        ("cache", 2, "adadecode: error: the prompt needs 99 positions"),
        ("transport", 2, "adadecode: error: rank 1 (pid 7 on n1) closed its control connection"),
        ("protocol", 3, "adadecode: internal error: ProtocolError: stage 1: no free cache slot"),
        (RuntimeError("CUDA error: device-side assert triggered"), 3, "adadecode: internal error: RuntimeError: CUDA"),
        (KeyError("model.layers.3.mlp.up_proj.bias"), 3, "adadecode: internal error: KeyError: "),
    ],
    ids=["value", "cache", "transport", "protocol", "torch", "other"],
)
def test_user_errors_are_one_line_and_bugs_show_a_traceback(monkeypatch, capsys, exc, status, line):
    from adadecode.runtime.events import ProtocolError
    from adadecode.runtime.kv_cache import CacheOverflowError
    from adadecode.runtime.transport.errors import TransportError

    exc = {
        "cache": CacheOverflowError("the prompt needs 99 positions but the KV cache holds 32"),
        "transport": TransportError("rank 1 (pid 7 on n1) closed its control connection: the process died"),
        "protocol": ProtocolError("stage 1: no free cache slot for sequence 3"),
    }.get(exc, exc)
    monkeypatch.setattr("adadecode.launcher.cli.cmd_generate", _raiser(exc))
    assert main(["generate", "--prompt", "x"]) == status
    err = capsys.readouterr().err
    assert line in err, err
    if status == 2:
        assert err.count("\n") == 1 and "Traceback" not in err
    else:
        assert err.startswith("Traceback (most recent call last)") and "a bug" in err and "status 3" in err


def test_an_interrupt_exits_130(monkeypatch, capsys):
    monkeypatch.setattr("adadecode.launcher.cli.cmd_generate", _raiser(KeyboardInterrupt()))
    assert main(["generate", "--prompt", "x"]) == 130


def test_a_rank_names_itself_in_every_report(capsys):
    from adadecode.launcher.errors import report_error
    from adadecode.runtime.transport.errors import JobAborted

    assert report_error(JobAborted("stopped by rank 0: TransportError: rank 1 died"), "rank 2: ") == 2
    assert report_error(RuntimeError("injected"), "rank 1: ") == 3
    assert report_error(KeyboardInterrupt(), "rank 0: ") == 130
    err = capsys.readouterr().err
    assert "adadecode: error: rank 2: stopped by rank 0: TransportError: rank 1 died\n" in err
    assert "adadecode: internal error: rank 1: RuntimeError: injected" in err
    assert "adadecode: rank 0: interrupted" in err


@pytest.mark.parametrize("codes, status", [([0, 0], 0), ([2, 3], 3), ([2, 2], 2), ([0, -9], 1), ([130, 2], 130)])
def test_a_spawned_job_exits_3_when_any_rank_hit_a_bug(monkeypatch, codes, status):
    from adadecode.launcher.cli import parse
    from adadecode.launcher.dist_env import read_dist_env
    from adadecode.launcher.distributed import plan_launch, spawn_local
    from adadecode.launcher.spawn import RankExit

    monkeypatch.setattr(
        "adadecode.launcher.spawn.spawn_ranks",
        lambda *a, **k: [RankExit(r, 100 + r, c) for r, c in enumerate(codes)],
    )
    _, cfg = parse(["generate", "--stages", "2", "--prompt", "x"])
    assert spawn_local(["generate"], cfg, plan_launch(cfg, read_dist_env())) == status
