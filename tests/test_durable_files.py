"""Files that survive interruption (issue 19): exit heads, the GGUF conversion cache and traces.

A kill is simulated by raising ``Killed`` (a BaseException, as nothing may catch it) at the
point where a process could die; the files are then read as the next run would read them.
Everything is tiny: a random 6-layer model, a fake conversion, a one-event trace.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from adadecode.launcher import trace_export
from adadecode.launcher.errors import is_user_error
from adadecode.runtime import atomic_io, exit_heads, model_source
from adadecode.runtime.exit_heads import (
    HEADS_FILE,
    MANIFEST_FILE,
    bundled_heads_path,
    load_exit_heads,
    read_manifest,
    save_exit_heads,
)
from adadecode.runtime.model_source import ENTRY_MARKER, fingerprint_dir, resolve_model
from helpers import save_tiny_model, write_gguf

D = 64  # tests/helpers.py TINY


class Killed(BaseException):
    """The process dies here."""


def _kill(*args, **kwargs):
    raise Killed


@pytest.fixture(scope="module")
def tiny(head_stage):
    """conftest.head_stage and the model's fingerprint."""
    path, config, modules = head_stage
    return path, config, modules, fingerprint_dir(path)


def _manifest(fingerprint: str) -> dict:
    return {
        "base_model": {"fingerprint": fingerprint, "origin": "test", "model_type": "llama",
                       "num_layers": 6, "hidden_size": D, "vocab_size": 96},
        "head_type": "linear",
        "layers": [2, 4],
        "default_layers": [4],
        "default_thresholds": {"2": 0.5, "4": 0.6},
    }


def _transforms(seed: int) -> dict[int, torch.Tensor]:
    torch.manual_seed(seed)
    return {l: torch.eye(D) + 0.1 * torch.randn(D, D) for l in (2, 4)}


def _load(tiny, path):
    _, config, m, fp = tiny
    return load_exit_heads(path, fingerprint=fp, config=config, norm=m.norm, lm_head_weight=m.lm_head.weight)


def _refused(tiny, path, *words) -> str:
    """Loading ``path`` fails with one line for the user that names the file and the fix."""
    with pytest.raises(ValueError) as e:
        _load(tiny, path)
    msg = str(e.value)
    assert is_user_error(e.value) and "\n" not in msg
    assert all(w in msg for w in (*words, "adadecode train-heads")), msg
    return msg


# --- exit heads -----------------------------------------------------------------------------------

def test_kill_between_the_two_writes_is_refused_by_name(tiny, tmp_path, monkeypatch):
    """The rerun's tensors are in place, its manifest is not: the old manifest's checksum tells."""
    out = tmp_path / "heads"
    save_exit_heads(out, _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    monkeypatch.setattr(exit_heads, "_dumps", _kill)  # the manifest's text is made just before its write
    with pytest.raises(Killed):
        save_exit_heads(out, _transforms(1), None, _manifest(tiny[3]), dtype=torch.float32)
    _refused(tiny, out, str(out / HEADS_FILE), "do not match")


def test_kill_during_the_heads_write_keeps_the_old_heads(tiny, tmp_path, monkeypatch):
    out = tmp_path / "heads"
    old = _transforms(0)
    save_exit_heads(out, old, None, _manifest(tiny[3]), dtype=torch.float32)
    real_save = safetensors.torch.save_file

    def half_then_die(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise Killed

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(Killed):
        save_exit_heads(out, _transforms(1), None, _manifest(tiny[3]), dtype=torch.float32)
    heads = _load(tiny, out)
    assert all(torch.equal(heads.params[l]["T"], old[l]) for l in old)
    assert sorted(p.name for p in out.iterdir()) == [HEADS_FILE, MANIFEST_FILE]  # no temporary file left


def test_train_heads_killed_before_its_manifest(tiny, tmp_path, monkeypatch):
    """`adadecode train-heads` rerun into a directory of heads, killed between its two writes."""
    from adadecode.runtime.head_training import train_heads
    from helpers import save_char_tokenizer, tiny_config

    model = save_tiny_model(tmp_path / "model")  # the same weights as `tiny`, and a tokenizer
    save_char_tokenizer(model, tiny_config().vocab_size)
    assert fingerprint_dir(model) == tiny[3]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("abc", "1 + 2", "x =")))
    out = save_exit_heads(tmp_path / "heads", _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    monkeypatch.setattr(exit_heads, "_dumps", _kill)
    with pytest.raises(Killed):
        train_heads(out, model=str(model), layers="2,4", prompts=str(tmp_path / "p.jsonl"),
                    heldout=str(tmp_path / "p.jsonl"), val_every=3, max_new_tokens=4, epochs=1,
                    batch_size=8, vocab_size="full", progress=False)
    _refused(tiny, out, str(out / HEADS_FILE))


@pytest.mark.parametrize("damage", ["empty", "8 bytes", "half", "one byte short", "garbled header", "flipped data"])
def test_damaged_heads_file_is_refused_by_name(tiny, tmp_path, damage):
    out = save_exit_heads(tmp_path / "heads", _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    file = out / HEADS_FILE
    data = file.read_bytes()
    damaged = {
        "empty": b"", "8 bytes": data[:8], "half": data[: len(data) // 2], "one byte short": data[:-1],
        "garbled header": data[:8] + b"#" * 16 + data[24:],
        "flipped data": data[:-100] + bytes(b ^ 0xFF for b in data[-100:]),
    }[damage]
    file.write_bytes(damaged)
    _refused(tiny, out, str(file))


@pytest.mark.parametrize("damage", ["half", "garbled header"])
def test_manifest_without_checksum_loads_and_a_damaged_file_is_still_named(tiny, tmp_path, damage):
    """A manifest written before checksums (no "files") loads as it did; safetensors' own header
    check catches a truncated or garbled file, and the error names it instead of a traceback."""
    old = _transforms(0)
    out = save_exit_heads(tmp_path / "heads", old, None, _manifest(tiny[3]), dtype=torch.float32)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest.pop("files", None)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert torch.equal(_load(tiny, out).params[2]["T"], old[2])
    data = (out / HEADS_FILE).read_bytes()
    (out / HEADS_FILE).write_bytes(data[: len(data) // 2] if damage == "half" else data[:8] + b"{" * 16 + data[24:])
    _refused(tiny, out, str(out / HEADS_FILE))


@pytest.mark.parametrize("damage", [
    "no base_model", "no fingerprint", "no default_layers", "no default_thresholds", "threshold key not a layer",
    "files not an object", "checksum not a string", "calibration without sweep", "truncated", "not an object",
])
def test_damaged_manifest_is_refused_by_name(tiny, tmp_path, damage):
    out = save_exit_heads(tmp_path / "heads", _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    file = out / MANIFEST_FILE
    m = json.loads(file.read_text())
    if damage == "no base_model":
        del m["base_model"]
    elif damage == "no fingerprint":
        del m["base_model"]["fingerprint"]
    elif damage == "no default_layers":
        del m["default_layers"]
    elif damage == "no default_thresholds":
        del m["default_thresholds"]
    elif damage == "threshold key not a layer":
        m["default_thresholds"]["four"] = 0.5
    elif damage == "files not an object":
        m["files"] = ["heads.safetensors"]
    elif damage == "checksum not a string":
        m["files"][HEADS_FILE]["sha256"] = None
    elif damage == "calibration without sweep":
        m["calibration"] = {"heads": {"2": {"top1_agreement": 0.5}}}
    text = json.dumps(m)
    file.write_text({"truncated": text[: len(text) // 2], "not an object": "[1, 2]"}.get(damage, text))
    _refused(tiny, out, str(file))
    with pytest.raises(ValueError, match="adadecode train-heads"):  # what runtime/loading.py reads first
        read_manifest(out)


def test_save_is_durable_and_writes_the_manifest_last(tiny, tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced descriptors")
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        replaced.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = (tmp_path / "heads").resolve()
    save_exit_heads(out, _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    assert replaced == [HEADS_FILE, MANIFEST_FILE]
    assert str(out) in synced  # the directory, so that the renames survive a power loss
    assert len([p for p in synced if p != str(out)]) >= 2  # each file's data, before its rename
    record = read_manifest(out)["files"][HEADS_FILE]
    assert record == {"bytes": (out / HEADS_FILE).stat().st_size, "sha256": atomic_io.sha256_file(out / HEADS_FILE)}
    assert all(oct((out / f).stat().st_mode & 0o777) == oct(0o644) for f in (HEADS_FILE, MANIFEST_FILE))


def test_stale_temporary_heads_file_is_removed_by_the_next_save(tiny, tmp_path):
    out = tmp_path / "heads"
    out.mkdir()
    stale, fresh = out / ".heads.tmp-1-dead.safetensors", out / ".heads.tmp-2-live.safetensors"
    for f in (stale, fresh):
        f.write_bytes(b"partial")
    hours_ago = time.time() - 2 * atomic_io.STALE_AFTER_S
    os.utime(stale, (hours_ago, hours_ago))
    save_exit_heads(out, _transforms(0), None, _manifest(tiny[3]), dtype=torch.float32)
    assert not stale.exists() and fresh.exists()  # a live writer's is left alone


def test_bundled_manifest_records_the_bundled_heads_checksum():
    path = bundled_heads_path()
    record = read_manifest(path)["files"][HEADS_FILE]
    assert record["bytes"] == (path / HEADS_FILE).stat().st_size
    assert record["sha256"] == atomic_io.sha256_file(path / HEADS_FILE)


def test_an_out_that_cannot_be_written_is_refused_before_training(tmp_path):
    from adadecode.runtime.head_training import train_heads

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in "abc"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):  # before the (missing) model is even looked at
        train_heads(tmp_path / "file", model=str(tmp_path / "no-model"), prompts=str(tmp_path / "p.jsonl"),
                    heldout=str(tmp_path / "p.jsonl"), val_every=2)


# --- the GGUF conversion cache --------------------------------------------------------------------

@pytest.fixture
def conversions(monkeypatch):
    """The ~20 s transformers conversion replaced by writing a tiny model; counts calls."""
    calls = []

    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        save_tiny_model(out_dir)

    monkeypatch.setattr(model_source, "_convert_gguf", convert)
    return calls


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("entry", ["sealed, then a file truncated", "no marker, a file truncated", "marker garbled"])
def test_half_cache_entry_is_never_used_but_converted_again(tmp_path, conversions, entry):
    src, cache = write_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache"
    first = resolve_model(str(src), cache_dir=cache)
    if entry != "marker garbled":
        _truncate(first.path / "model.safetensors")
    if entry == "no marker, a file truncated":  # as a crash of an adadecode without fsync could leave it
        (first.path / ENTRY_MARKER).unlink()
    if entry == "marker garbled":
        (first.path / ENTRY_MARKER).write_text('{"files": ')
    again = resolve_model(str(src), cache_dir=cache)
    assert len(conversions) == 2
    assert again.path == first.path and again.fingerprint == first.fingerprint
    assert json.loads((again.path / ENTRY_MARKER).read_text())["files"]["model.safetensors"] > 0
    assert not list(cache.glob(".*.tmp-*"))  # the half entry was moved aside and removed


def test_whole_entry_of_an_older_version_is_sealed_not_converted_again(tmp_path, conversions):
    src, cache = write_gguf(tmp_path / "tiny.gguf"), tmp_path / "cache"
    first = resolve_model(str(src), cache_dir=cache)
    (first.path / ENTRY_MARKER).unlink()
    assert resolve_model(str(src), cache_dir=cache) == first
    assert len(conversions) == 1 and (first.path / ENTRY_MARKER).is_file()


def test_entry_is_sealed_and_fsynced_before_it_is_published(tmp_path, monkeypatch, conversions):
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    r = resolve_model(str(write_gguf(tmp_path / "tiny.gguf")), cache_dir=tmp_path / "cache")
    publish = events.index(("rename", r.path.name))
    assert events[:publish].count("fsync") >= 3 and "fsync" in events[publish + 1:]  # files, then the cache dir
    assert set(json.loads((r.path / ENTRY_MARKER).read_text())["files"]) >= {"config.json", "model.safetensors"}


def test_dead_converters_temporary_directories_are_removed(tmp_path, conversions):
    cache = tmp_path / "cache"
    dead, live = cache / ".dead-0123-v1.tmp-abc", cache / ".live-4567-v1.tmp-def"
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"half")
    with open(cache / ".live-4567-v1.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a converter in another process, at work
        resolve_model(str(write_gguf(tmp_path / "tiny.gguf")), cache_dir=cache)
    assert not dead.exists() and live.exists()


def test_without_locks_only_old_temporary_directories_are_removed(tmp_path, monkeypatch, conversions):
    def no_locks(fh, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(model_source.fcntl, "flock", no_locks)
    cache = tmp_path / "cache"
    old, recent = cache / ".a-0123-v1.tmp-abc", cache / ".b-4567-v1.tmp-def"
    for d in (old, recent):
        d.mkdir(parents=True)
    days_ago = time.time() - 2 * model_source.STALE_TMP_S
    os.utime(old, (days_ago, days_ago))
    resolve_model(str(write_gguf(tmp_path / "tiny.gguf")), cache_dir=cache)
    assert not old.exists() and recent.exists()


# --- traces ---------------------------------------------------------------------------------------

def test_trace_killed_while_drawing_keeps_the_previous_files(tmp_path, monkeypatch):
    events, stages = [("compute", 0, 0, 1000, 0, 0, 0, 1, 0, 2, "plain")], [(0, 2)]
    json_path, png_path = trace_export.write_trace(tmp_path / "t", events, stages)
    before = json_path.read_bytes(), png_path.read_bytes()

    def draw_half_then_die(events, stages, path):
        Path(path).write_bytes(before[1][:100])
        raise Killed

    monkeypatch.setattr(trace_export, "gantt_png", draw_half_then_die)
    with pytest.raises(Killed):
        trace_export.write_trace(tmp_path / "t", events * 2, stages)
    assert png_path.read_bytes() == before[1]
    assert trace_export.read_trace(json_path)[0]  # whole: the new one, or the old one
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["trace.json", "trace.png"]


def test_atomic_write_failing_midway_leaves_the_old_file(tmp_path):
    target = atomic_io.write_text(tmp_path / "f.json", '{"old": 1}')
    with pytest.raises(Killed), atomic_io.replacing(target) as tmp:
        tmp.write_text('{"ne')
        raise Killed
    assert target.read_text() == '{"old": 1}' and [p.name for p in tmp_path.iterdir()] == ["f.json"]
