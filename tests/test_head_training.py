"""Training exit heads (runtime/head_training/, `adadecode train-heads`) on a tiny random model:
the greedy pass, the whole pipeline end to end (linear and MLP heads, and decoding with the MLP
heads it wrote), the base model's device and dtype, and the refusals of bad arguments."""

from __future__ import annotations

import json

import pytest
import torch
from adadecode.runtime.exit_heads import load_exit_heads
from adadecode.runtime.hf_adapter import load_hf_config, load_stage_modules
from adadecode.runtime.model_source import fingerprint_dir
from helpers import save_char_tokenizer, save_tiny_model

D, V = 64, 96  # tests/helpers.py TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model with a tokenizer, 7 train and 2 held-out prompts, and the flags that use them."""
    root = tmp_path_factory.mktemp("train_heads")
    model = save_tiny_model(root / "model", seed=3)
    save_char_tokenizer(model, V)
    lines = [{"prompt": p} for p in ("def f(x):", "the cat sat", "1 + 2 =", "hello world", "abc", "SELECT")]
    lines.append({"messages": [{"role": "user", "content": "hi"}]})
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "held.jsonl").write_text(json.dumps({"prompt": "zebra"}) + "\n" + json.dumps({"prompt": "x = 4"}) + "\n")
    flags = ["--model", str(model), "--layers", "2,4", "--prompts", str(root / "train.jsonl"),
             "--heldout", str(root / "held.jsonl"), "--val-every", "3", "--max-new-tokens", "12", "--epochs", "4",
             "--lr", "3e-3", "--batch-size", "16", "--vocab-coverage", "0.9", "--no-progress", "--seed", "1"]
    return model, flags


def _load(model, out):
    config = load_hf_config(model)
    m = load_stage_modules(model, config, 6, 6, embed=False, head=True)
    return load_exit_heads(out, fingerprint=fingerprint_dir(model), config=config, norm=m.norm,
                           lm_head_weight=m.lm_head.weight)


def test_train_heads_end_to_end_on_a_tiny_model(tiny_run, tmp_path):
    from adadecode.launcher.cli import main

    model, flags = tiny_run
    out = tmp_path / "heads"
    argv = ["train-heads", *flags, "--out", str(out)]
    assert main(argv) == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["fingerprint"] == fingerprint_dir(model)
    assert manifest["layers"] == [2, 4] and set(manifest["default_thresholds"]) == {"2", "4"}
    assert manifest["training"]["command"].startswith("adadecode train-heads --model")
    assert (manifest["training"]["device"], manifest["training"]["dtype"]) == ("cpu", "float32")  # auto here
    data = manifest["training"]["data"]
    assert (data["train"]["prompts"], data["validation"]["prompts"], data["heldout"]["prompts"]) == (5, 2, 2)
    assert data["train"]["tokens"] > 5
    table = manifest["calibration"]
    assert table["split"] == "heldout" and table["tokens"] == data["heldout"]["tokens"]
    for layer in ("2", "4"):
        head = table["heads"][layer]
        assert 0.0 <= head["top1_agreement"] <= 1.0
        assert [r["threshold"] for r in head["sweep"]] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
        rates = [r["exit_rate"] for r in head["sweep"]]
        assert rates == sorted(rates, reverse=True)
        losses = manifest["training"]["loss_per_epoch"][layer]
        assert len(losses) == 4 and losses[-1] < losses[0]
    vocab = manifest["vocabulary"]
    assert vocab["restricted"] and vocab["size"] < V and vocab["coverage"]["train"] >= 0.9

    heads = _load(model, out)
    assert heads.available_layers == (2, 4) and heads.layers == tuple(manifest["default_layers"])
    token, conf = heads.select([2, 4]).predict(2, torch.randn(D))
    assert token in heads.vocab_ids.tolist() and 0.0 < conf <= 1.0

    # each validation token's outcome at every head, which the head choice counts exits on
    from adadecode.runtime.exit_heads import read_outcomes

    outcomes = read_outcomes(out, manifest)
    assert sorted(outcomes) == [2, 4]
    val = manifest["validation_calibration"]
    for layer, (conf, agree) in outcomes.items():
        assert conf.shape == agree.shape == (val["tokens"],) and agree.dtype == torch.bool
        row = next(r for r in val["heads"][str(layer)]["sweep"] if r["threshold"] == 0.5)
        assert (conf > 0.5).float().mean().item() == pytest.approx(row["exit_rate"], abs=2e-3)
        assert agree.float().mean().item() == pytest.approx(val["heads"][str(layer)]["top1_agreement"], abs=1e-3)

    # same seed, same heads
    assert main([*argv[:-1], str(tmp_path / "again")]) == 0
    from safetensors.torch import load_file

    assert all(torch.equal(a, b) for a, b in zip(load_file(str(out / "heads.safetensors")).values(),
                                                  load_file(str(tmp_path / "again" / "heads.safetensors")).values()))


@pytest.fixture(scope="module")
def mlp_heads(tiny_run, tmp_path_factory):
    """`train-heads --head-type mlp` on the tiny model: the directory it wrote."""
    from adadecode.launcher.cli import main

    model, flags = tiny_run
    out = tmp_path_factory.mktemp("mlp") / "heads"
    assert main(["train-heads", *flags, "--head-type", "mlp", "--mlp-hidden", "16", "--out", str(out)]) == 0
    return out


def test_train_heads_writes_loadable_mlp_heads(tiny_run, mlp_heads):
    model, _ = tiny_run
    manifest = json.loads((mlp_heads / "manifest.json").read_text())
    assert (manifest["head_type"], manifest["mlp_hidden"]) == ("mlp", 16)
    assert "--head-type mlp --mlp-hidden 16" in manifest["training"]["command"]
    for layer in ("2", "4"):
        losses = manifest["training"]["loss_per_epoch"][layer]
        assert len(losses) == 4 and losses[-1] < losses[0]
        assert manifest["calibration"]["heads"][layer]["sweep"]  # calibrated like linear heads
    heads = _load(model, mlp_heads)
    assert heads.available_layers == (2, 4) and heads.layers == tuple(manifest["default_layers"])
    for layer in (2, 4):
        p = heads.params[layer]
        assert {k: tuple(t.shape) for k, t in p.items()} == {"T": (D, D), "W1": (16, D), "W2": (D, 16), "g": (D,)}
        assert p["W2"].abs().max() > 0  # trained: it starts at zero
    token, conf = heads.select([2, 4]).predict(4, torch.randn(D))
    assert token in heads.vocab_ids.tolist() and 0.0 < conf <= 1.0
    from adadecode.runtime.exit_heads import read_outcomes

    assert sorted(read_outcomes(mlp_heads, manifest)) == [2, 4]


def test_decoding_with_trained_mlp_heads_gives_the_tokens_of_early_exit_off(tiny_run, mlp_heads):
    """Eager and deferred on 1 and 2 stages, the heads at low thresholds: early tokens from both
    heads, many of them wrong, all verified (for deferred, equal tokens are also the CPU fp32
    property of tests/test_early_exit.py)."""
    from helpers import make_engine

    model, _ = tiny_run
    prompt, seen = [5, 17, 33, 2, 9, 41, 7], {"early": set(), "rollbacks": 0, "accepted": 0, "merged": 0}
    for ranges in ([(0, 6)], [(0, 3), (3, 6)]):
        engine = make_engine(model, ranges)
        last = engine.stages[-1].model.modules
        heads = load_exit_heads(mlp_heads, fingerprint=fingerprint_dir(model), config=load_hf_config(model),
                                norm=last.norm, lm_head_weight=last.lm_head.weight)
        assert heads.params[2].keys() == {"T", "W1", "W2", "g"}
        for stage in engine.stages:
            stage.heads = heads.select([2, 4], thresholds={2: 0.5, 4: 0.0})
        off = engine.generate(prompt, max_new_tokens=24).tokens
        for mode in ("eager", "deferred"):
            merged = sum(stage.stats.merged for stage in engine.stages)
            res = engine.generate(prompt, max_new_tokens=24, early_exit=mode)
            assert res.tokens == off, (ranges, mode)
            seen["early"] |= set(res.stats["early_by_layer"])
            seen["rollbacks"] += res.stats["rollbacks"]
            seen["accepted"] += res.stats["accepted"]
            if mode == "deferred":
                seen["merged"] += sum(stage.stats.merged for stage in engine.stages) - merged
    # the premises: both heads exited, verification undid work and kept some, deferred merged
    assert seen["early"] == {2, 4} and seen["rollbacks"] > 5 and seen["accepted"] > 0 and seen["merged"] > 0, seen


def test_train_heads_with_an_explicit_device_and_dtype(tiny_run, tmp_path):
    """The base model in bfloat16 on the CPU (the GPU path's dtype); the heads still train in float32."""
    from adadecode.launcher.train_heads import main

    model, flags = tiny_run
    out = tmp_path / "bf16"
    assert main([*flags, "--out", str(out), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert (training["device"], training["dtype"]) == ("cpu", "bfloat16")
    assert "--device cpu --dtype bfloat16" in training["command"]
    for losses in training["loss_per_epoch"].values():
        assert losses[-1] < losses[0]
    heads = _load(model, out).select([2, 4])
    for layer in (2, 4):
        token, conf = heads.predict(layer, torch.randn(D))
        assert token in heads.vocab_ids.tolist() and 0.0 < conf <= 1.0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_train_heads_on_cuda_by_default_when_there_is_a_gpu(tiny_run, tmp_path):
    """auto: cuda:0 and bfloat16; the heads load (on the CPU here) like any others."""
    from adadecode.launcher.train_heads import main

    model, flags = tiny_run
    out = tmp_path / "cuda"
    assert main([*flags, "--out", str(out)]) == 0
    training = json.loads((out / "manifest.json").read_text())["training"]
    assert (training["device"], training["dtype"]) == ("cuda:0", "bfloat16")
    token, conf = _load(model, out).select([2, 4]).predict(4, torch.randn(D))
    assert 0 <= token < V and 0.0 < conf <= 1.0


@needs_cuda
def test_training_on_cuda_never_waits_for_the_device_per_step():
    import warnings

    from adadecode.runtime.head_training.collect import Split
    from adadecode.runtime.head_training.train import train
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    cuda, bf16, epochs = torch.device("cuda", 0), torch.bfloat16, 2
    n = 20 * 32  # 20 steps of 32 tokens per epoch
    torch.manual_seed(0)
    split = Split("train", "-", 1, {l: torch.randn(n, D, device=cuda, dtype=bf16) for l in (2, 4)},
                  torch.randn(n, D, device=cuda, dtype=bf16), torch.zeros(n, dtype=torch.long, device=cuda))
    norm = LlamaRMSNorm(D).to(cuda, bf16)
    weight = torch.randn(V, D, device=cuda, dtype=bf16)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            transforms, history = train(split, [2, 4], norm, weight, epochs=epochs, lr=1e-3, batch_size=32,
                                        warmup=0.05, seed=0, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= epochs, [str(w.message) for w in syncs]  # at most the batch order's copy, per epoch
    assert all(t.device == cuda and t.dtype == torch.float32 for p in transforms.values() for t in p.values())
    assert all(h.shape == (epochs,) and h.device == cuda for h in history.values())


def test_train_heads_refuses_a_device_it_cannot_use(tiny_run, tmp_path, capsys):
    from adadecode.launcher.train_heads import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model, _ = tiny_run
    assert main(["--model", str(model), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device `cuda` needs a CUDA GPU" in err and "use --device cpu" in err and "model.device" not in err
    assert main(["--model", str(model), "--out", str(tmp_path / "o"), "--device", "gpu"]) == 2
    assert "--device `gpu` is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_heads_rejects_an_unknown_dtype(tiny_run, tmp_path, capsys):
    from adadecode.launcher.train_heads import main

    model, _ = tiny_run
    with pytest.raises(SystemExit) as e:
        main(["--model", str(model), "--out", str(tmp_path / "o"), "--dtype", "float8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype: invalid choice: 'float8'" in err and "bfloat16" in err


def test_train_heads_rejects_bad_layers(tiny_run, tmp_path, capsys):
    from adadecode.launcher.train_heads import main

    _, flags = tiny_run
    assert main([*flags, "--out", str(tmp_path / "o"), "--layers", "0,6"]) == 2
    assert "1..5" in capsys.readouterr().err


def test_train_heads_rejects_an_unknown_head_type_and_hidden_size(tiny_run, tmp_path, capsys):
    from adadecode.launcher.train_heads import main

    _, flags = tiny_run
    with pytest.raises(SystemExit) as e:
        main([*flags, "--out", str(tmp_path / "o"), "--head-type", "adapter"])
    assert e.value.code == 2 and "--head-type: invalid choice: 'adapter'" in capsys.readouterr().err
    assert main([*flags, "--out", str(tmp_path / "o"), "--head-type", "mlp", "--mlp-hidden", "0"]) == 2
    assert "--mlp-hidden 0: expected a hidden size >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- outcomes for heads that have none: `train-heads --outcomes-only` ---------------------------------


def _extra_prompts(tmp_path):
    """A --validation-extra file: two prompts unlike the train file's, one plain, one chat."""
    extra = tmp_path / "extra.jsonl"
    lines = [{"prompt": "for i in range(3):"}, {"messages": [{"role": "user", "content": "why?"}]}]
    extra.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return extra


def _before_outcomes(src, dst):
    """A copy of the heads in ``src`` as train-heads wrote them before per-token outcomes existed:
    no outcomes file or record, no validation calibration, other defaults, no choice."""
    import shutil

    from adadecode.runtime.exit_heads import OUTCOMES_FILE

    shutil.copytree(src, dst)
    (dst / OUTCOMES_FILE).unlink()
    m = json.loads((dst / "manifest.json").read_text())
    del m["files"][OUTCOMES_FILE], m["choice"], m["training"]["data"]["validation"]["files"]
    m.update(validation_calibration=None, default_layers=[2], default_thresholds={"2": 0.99, "4": 0.99})
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.fixture(scope="module")
def plain_heads(tiny_run, tmp_path_factory):
    """`train-heads` on the tiny model, without --validation-extra: the directory it wrote."""
    from adadecode.launcher.cli import main

    _, flags = tiny_run
    out = tmp_path_factory.mktemp("plain") / "heads"
    assert main(["train-heads", *flags, "--out", str(out)]) == 0
    return out


def test_outcomes_only_gives_the_outcomes_training_gave_and_leaves_the_heads(tiny_run, tmp_path):
    """Heads trained (with an extra validation file), then stripped of their outcomes: --outcomes-only
    writes the outcomes, calibration, defaults and validation record that training wrote for the
    same heads and prompts, and never touches heads.safetensors."""
    from adadecode.launcher.cli import main
    from adadecode.runtime.exit_heads import read_manifest, read_outcomes

    model, flags = tiny_run
    extra = _extra_prompts(tmp_path)
    full = tmp_path / "full"
    assert main(["train-heads", *flags, "--validation-extra", str(extra), "--out", str(full)]) == 0
    old = _before_outcomes(full, tmp_path / "old")
    heads_bytes = (old / "heads.safetensors").read_bytes()
    assert read_outcomes(old, read_manifest(old)) is None

    # model, prompts, --val-every and --max-new-tokens: the manifest's
    assert main(["train-heads", "--outcomes-only", "--out", str(old), "--validation-extra", str(extra),
                 "--no-progress"]) == 0
    assert (old / "heads.safetensors").read_bytes() == heads_bytes
    want, got = read_manifest(full), read_manifest(old)  # both verify
    expected, outcomes = read_outcomes(full, want), read_outcomes(old, got)  # checksums verified
    assert sorted(outcomes) == [2, 4]
    for l in (2, 4):
        assert torch.equal(outcomes[l][0], expected[l][0]) and torch.equal(outcomes[l][1], expected[l][1])
    for key in ("validation_calibration", "default_layers", "default_thresholds", "choice", "vocabulary"):
        assert got[key] == want[key], key
    assert got["training"]["data"] == want["training"]["data"]
    assert got["files"]["heads.safetensors"] == want["files"]["heads.safetensors"]
    assert got["outcomes"]["val_every"] == 3 and got["outcomes"]["max_new_tokens"] == 12
    assert got["outcomes"]["command"].startswith("adadecode train-heads --outcomes-only")
    assert _load(model, old).layers == tuple(want["default_layers"])  # the runtime's loader checks the checksum


def test_validation_extra_adds_its_tokens_and_the_choice_counts_exits_exactly(tiny_run, plain_heads, tmp_path,
                                                                           monkeypatch):
    from adadecode.launcher.train_heads import main
    from adadecode.runtime.exit_heads import read_manifest, read_outcomes
    from adadecode.runtime.loading import plan_stages
    from adadecode.runtime.sim import heads as sim_heads

    model, _ = tiny_run
    old = _before_outcomes(plain_heads, tmp_path / "old")
    assert main(["--outcomes-only", "--out", str(old), "--no-progress"]) == 0
    base = read_manifest(old)["training"]["data"]["validation"]
    assert base["prompts"] == 2 and [f["select"] for f in base["files"]] == ["every 3-th prompt"]

    extra = _extra_prompts(tmp_path)
    assert main(["--outcomes-only", "--out", str(old), "--validation-extra", str(extra), "--no-progress"]) == 0
    manifest = read_manifest(old)
    record = manifest["training"]["data"]["validation"]
    assert [f["file"] for f in record["files"]] == [base["file"], str(extra)]
    assert record["files"][0] == base["files"][0]  # the train file's prompts answer as before
    added = record["files"][1]
    assert (added["prompts"], added["select"]) == (2, "all") and added["tokens"] >= 2
    assert (record["prompts"], record["tokens"]) == (4, base["tokens"] + added["tokens"])
    assert manifest["validation_calibration"]["tokens"] == record["tokens"]
    outcomes = read_outcomes(old, manifest)
    assert all(conf.shape == (record["tokens"],) for conf, _ in outcomes.values())
    assert str(extra) in manifest["choice"]["note"]

    # the head choice counts these outcomes token by token, never the table's estimate
    def estimate(*args):
        raise AssertionError("conditional_exits used despite per-token outcomes")

    monkeypatch.setattr(sim_heads, "conditional_exits", estimate)
    config = load_hf_config(model)
    choice = sim_heads.choose(manifest, config, plan_stages(config, 2), "eager", "cpu", 4, 2,
                              outcomes=read_outcomes(old, manifest), alone=True)
    assert list(choice.layers) == manifest["default_layers"]
    assert choice.speedup == manifest["choice"]["simulated_speedup"]

    # a rerun validates on the same prompts; `none` drops the extra file
    assert main(["--outcomes-only", "--out", str(old), "--no-progress"]) == 0
    assert read_manifest(old)["training"]["data"]["validation"] == record
    assert main(["--outcomes-only", "--out", str(old), "--validation-extra", "none", "--no-progress"]) == 0
    assert read_manifest(old)["training"]["data"]["validation"] == base


def test_outcomes_only_refuses_a_directory_without_heads_and_training_options(tiny_run, plain_heads, tmp_path,
                                                                            capsys):
    from adadecode.launcher.train_heads import main

    model, _ = tiny_run
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--outcomes-only", "--out", str(empty), "--model", str(model)]) == 2
    err = capsys.readouterr().err
    assert f"--out {empty} holds no exit heads" in err and "train them first" in err
    assert main(["--outcomes-only", "--out", str(plain_heads), "--epochs", "2", "--heldout", "x.jsonl"]) == 2
    assert "--epochs, --heldout: training options; --outcomes-only keeps the heads" in capsys.readouterr().err
    assert main(["--outcomes-only", "--out", str(plain_heads), "--val-every", "2"]) == 2
    assert "trained with --val-every 3" in capsys.readouterr().err
    assert main(["--outcomes-only", "--out", str(plain_heads), "--validation-extra", "none,x.jsonl"]) == 2
    assert "do not combine" in capsys.readouterr().err


def test_collect_matches_single_prompt_greedy_and_hidden_states(tmp_path):
    """The batched, left-padded loop (rows leave at EOS) gives each prompt's own greedy tokens
    and the hidden states a single-prompt forward computes."""
    from adadecode.runtime.head_training.collect import collect
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


def test_auto_layers_add_the_stage_boundaries():
    """Every L/10 layers, and the first layer of each later stage (an exit there lets the next
    token in as the stage hands over); boundaries outside 1..L-2 are dropped."""
    from adadecode.runtime.head_training.pipeline import parse_layers

    assert parse_layers("auto", 30) == [4, 7, 10, 13, 16, 19, 22, 25, 28]
    assert parse_layers("auto", 30, [19, 12, 25, 9, 18, 28, 29, 0]) == [4, 7, 9, 10, 12, 13, 16, 18, 19, 22, 25, 28]
    assert parse_layers("3,5", 30, [12]) == [3, 5]  # given layers are taken as given
