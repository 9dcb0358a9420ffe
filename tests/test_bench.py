"""`adadecode bench` (launcher/bench.py) on a tiny model that speaks text, in process: which
reference its parity check takes, eager stages against compiled ones."""

from __future__ import annotations

import json

import pytest
from adadecode.launcher import bench
from adadecode.launcher.cli import parse
from adadecode.runtime.compiled_step import CompiledStep
from adadecode.runtime.engine import Engine
from helpers import save_identity_heads, save_tiny_chat_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    path = save_tiny_chat_model(root / "model", max_position_embeddings=256)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello there", "def add(a, b):")))
    return path, save_identity_heads(path, root / "heads", {3: 0.0}), prompts


def bench_json(tiny, capsys, *, compiled: bool) -> tuple[int, dict]:
    path, heads, prompts = tiny
    args, cfg = parse(["bench", "--model", str(path), "--prompts", str(prompts), "--num-prompts", "2", "--warmup", "0",
                       "--max-new-tokens", "6", "--modes", "eager", "--json", f"--decoding.heads={heads}"])
    engine = Engine.load(str(path), heads=str(heads), max_seq_len=128, device="cpu", dtype="float32")
    if compiled:  # dynamo's eager backend: the compiled step's code path with the eager path's bits
        for stage in engine.stages:
            stage.model.step = CompiledStep(stage.model, [3], 3, backend="eager")
    status = bench.run_bench(args, cfg, bench.plan_bench(args, cfg), engine)
    return status, json.loads(capsys.readouterr().out)


def test_eager_stages_are_checked_against_generate(tiny, capsys):
    status, out = bench_json(tiny, capsys, compiled=False)
    assert status == 0 and out["reference"] == "hf"
    assert list(out["results"]) == ["hf", "eager"]
    assert out["results"]["eager"]["token_identical_prompts"] == "2/2"
    assert "identical_to_hf_generate" not in out["results"]["eager"]


def test_compiled_stages_are_checked_against_their_own_plain_decoding(tiny, capsys):
    """`off` is timed first even when not asked for: it is the reference; each row also counts the
    prompts identical to `generate`'s."""
    status, out = bench_json(tiny, capsys, compiled=True)
    assert status == 0 and out["reference"].startswith("off")
    assert list(out["results"]) == ["hf", "off", "eager"]
    assert out["results"]["eager"]["token_identical_prompts"] == "2/2"
    assert out["results"]["eager"]["identical_to_hf_generate"] == "2/2"


def test_a_compiled_run_that_rounds_unlike_generate_still_passes(tiny, capsys, monkeypatch):
    """Compiled kernels may round differently from transformers' (docs/exactness.md): a compiled run
    whose tokens differ from `generate`'s reports it and passes; an eager run fails."""
    real = bench.hf_generate

    def other_tokens(*args, **kwargs):
        tokens, seconds = real(*args, **kwargs)
        return [t + 1 for t in tokens], seconds

    monkeypatch.setattr(bench, "hf_generate", other_tokens)
    status, out = bench_json(tiny, capsys, compiled=True)
    assert status == 0
    assert out["results"]["eager"]["token_identical_prompts"] == "2/2"
    assert out["results"]["off"]["identical_to_hf_generate"] == "0/2"
    status, out = bench_json(tiny, capsys, compiled=False)
    assert status == 1 and out["results"]["eager"]["token_identical_prompts"] == "0/2"
